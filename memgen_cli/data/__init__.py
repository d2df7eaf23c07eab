"""Tasks: datasets, answer extraction and grading, shared by training and evaluation.

``get_task(spec, **options)`` resolves a task name (``gsm8k``, ``gsm_symbolic``,
``gym:chain_sum``, ``math``, ``gpqa``, ``triviaqa``, ``kodcode``, ``jsonl``, and the text games
``textworld:coin_collector`` / ``textworld:treasure_hunter``, which are played as episodes:
``data/environment.py``) or a path to a GSM8K-format ``.jsonl`` file or directory into a
:class:`Task`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from memgen_cli.data.base import Example, Task, read_jsonl, require_columns, to_messages
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.gpqa import GPQATask
from memgen_cli.data.gsm8k import GSM8KTask
from memgen_cli.data.gym import GSMSymbolicTask, GymTask
from memgen_cli.data.jsonl import JsonlTask
from memgen_cli.data.kodcode import KodCodeTask
from memgen_cli.data.math import MathTask
from memgen_cli.data.textworld import TextWorldTask
from memgen_cli.data.triviaqa import TriviaQATask
from memgen_cli.errors import MemgenError, did_you_mean

__all__ = [
    "KNOWN_TASKS",
    "EnvironmentTask",
    "Example",
    "Task",
    "get_task",
    "read_jsonl",
    "require_columns",
    "to_messages",
]

GYM_PREFIX = "gym:"
TEXTWORLD_PREFIX = "textworld:"
_TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8KTask,
    "gsm_symbolic": GSMSymbolicTask,
    "math": MathTask,
    "gpqa": GPQATask,
    "triviaqa": TriviaQATask,
    "kodcode": KodCodeTask,
    "jsonl": JsonlTask,
}
KNOWN_TASKS: list[str] = [*_TASKS, "gym:<name>", "textworld:<challenge>"]


def get_task(spec: str, **options) -> Task:
    """The task named by ``spec``, built with ``options`` (e.g. ``path=``, ``grader=``).

    A spec that ends in ``.jsonl`` or names an existing file or directory is read as
    GSM8K-format data (``question``, ``answer`` ending in ``#### N``).
    """
    if spec.startswith(GYM_PREFIX):
        return _build(GymTask, spec, options, spec[len(GYM_PREFIX) :])
    if spec.startswith(TEXTWORLD_PREFIX):
        return _build(TextWorldTask, spec, options, spec[len(TEXTWORLD_PREFIX) :])
    if spec in _TASKS:
        return _build(_TASKS[spec], spec, options)
    if spec.endswith(".jsonl") or Path(spec).exists():
        if not Path(spec).exists():
            raise MemgenError(f"data file not found: {spec}")
        return _build(GSM8KTask, spec, {**options, "path": spec})
    raise MemgenError(
        f"unknown task {spec!r}. Known tasks: {', '.join(_TASKS)}, gym:<name> (any "
        "reasoning_gym dataset, e.g. gym:chain_sum), textworld:<challenge> (coin_collector, "
        "treasure_hunter: text games played as episodes), or a path to a GSM8K-format .jsonl "
        "file or directory." + did_you_mean(spec, _TASKS)
    )


def _build(cls: type[Task], spec: str, options: dict, *args) -> Task:
    """``cls(*args, **options)``, with unknown option names reported, not a TypeError."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in options:
        if key not in accepted or (args and key == accepted[0]):
            raise MemgenError(
                f"task {spec!r} has no option {key!r}; its options are "
                f"{', '.join(accepted[len(args) :]) or 'none'}." + did_you_mean(key, accepted)
            )
    return cls(*args, **options)
