"""Procedurally generated tasks from ``reasoning_gym``: offline, seeded, verifiable.

``gsm_symbolic`` (the default offline task) gives GSM8K-style word problems with a worked
solution; ``gym:<name>`` gives any of reasoning_gym's datasets (``gym:chain_sum``,
``gym:basic_arithmetic``, ...). The split picks the generator seed: ``train`` uses
``TRAIN_SEED`` and every evaluation split uses ``EVAL_SEED``, unless the caller passes one.

A reasoning_gym scorer that raises is an error, not a wrong answer: the answer scores 0 but
``grade_checked`` returns the exception, ``memgen eval`` and the GRPO reward count them
(``grader_errors``), and ``GraderErrors.check`` stops a run where they pass the tolerance.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from memgen_cli.data.arithmetic import worked_solution
from memgen_cli.data.base import Example, Task
from memgen_cli.data.graders import (
    extract_boxed,
    extract_math_answer,
    numeric_equal,
    to_number,
)
from memgen_cli.errors import MemgenError

TRAIN_SEED = 42
# reasoning_gym seeds item i of a dataset with Random(seed + i), so a train set of n items
# uses generator states 42 .. 42+n-1. An evaluation seed of 4242 would collide with train
# item 4200 onwards; 1_000_000 keeps the two ranges apart for any train set below ~1e6.
EVAL_SEED = 1_000_000
DEFAULT_SIZE = {"train": 5000, "eval": 500}
# A scorer may choke on the odd completion now and then, but one that raises on more than 2 %
# of the answers it grades (and on at least 3) is broken: its zeros would read as the model's
# failures, so the run stops instead.
MAX_GRADER_ERROR_RATE = 0.02
MIN_GRADER_ERRORS = 3


_CONFIG_ERRORS = (TypeError, ValueError, AssertionError)
# Run by ``_generated`` under PYTHONHASHSEED=0: reads [name, seed, size, config] as JSON on
# stdin, writes ("ok", items) or ("config", message) pickled on stdout.
_CHILD = """
import json, pickle, sys
answer, sys.stdout = sys.stdout.buffer, sys.stderr  # whatever a generator prints stays out
import reasoning_gym
name, seed, size, config = json.load(sys.stdin)
try:
    dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    out = ("ok", [dataset[i] for i in range(len(dataset))])
except (TypeError, ValueError, AssertionError) as e:
    out = ("config", str(e))
pickle.dump(out, answer)
"""


@functools.lru_cache(maxsize=16)
def _generated(name: str, seed: int, size: int, config: str) -> bytes:
    """``GymTask._entries`` in a child process with hash randomization off, as the child's
    pickled answer (unpickled afresh by each caller, so no two loads share an item);
    ``config``: the dataset's config as JSON with sorted keys (recipes' options are YAML)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    request = json.dumps([name, seed, size, json.loads(config)]).encode()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], input=request, capture_output=True, env=env, check=False
    )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise MemgenError(
            f"generating reasoning_gym dataset {name!r} (seed {seed}, {size} items) in a child "
            f"process failed with exit code {done.returncode}: {tail[0]}"
        )
    return done.stdout


def gym_names() -> list[str]:
    """Names of every dataset that the installed reasoning_gym registers."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_name(name: str) -> None:
    names = gym_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5) or names[:5]
        raise MemgenError(
            f"reasoning_gym has no dataset {name!r}. Close names: "
            f"{', '.join('gym:' + n for n in close)} ({len(names)} datasets in all; "
            "list them with: python -c 'import reasoning_gym.factory as f; print(*f.DATASETS)')."
        )


def extract_gym_answer(completion: str) -> str | None:
    """A box, else the last ``<answer>..</answer>`` (reasoning_gym's own format), else
    the last non-empty line.

    >>> extract_gym_answer("olleh\\n<answer>hello</answer>"), extract_gym_answer("a\\nb\\n")
    ('hello', 'b')
    """
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed
    tagged = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion or "", re.S)
    if tagged:
        return tagged[-1]
    lines = [line.strip() for line in (completion or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


class GymTask(Task):
    """A reasoning_gym dataset, ``gym:<name>``.

    The example's ``solution`` is the dataset's worked solution when it has one
    (``metadata["answer_cot"]``); for arithmetic tasks whose metadata has an ``expression``
    (basic_arithmetic, chain_sum, products, ...) it is a step-by-step working written from
    that expression (``data/arithmetic.py``), ending in ``\\boxed{answer}``; otherwise the
    bare answer (SFT then trains answer-only targets).

    Grading counts only exact answers (1.0 or 0.0). A numeric gold answer is graded like
    GSM8K: the completion's box, else ``#### N``, else its last number, compared as numbers.
    Any other answer goes through the dataset's own ``score_answer``, and only its full
    score counts: reasoning_gym gives partial credit on some tasks (0.5 for a wrong number in
    basic_arithmetic, per-character credit in spell_backward), which is not a solved problem.

    Options: ``size`` (items generated when no limit is given), ``config`` (keyword
    arguments for the dataset's config, e.g. ``{"min_terms": 2}``), ``exclude_train``:
    evaluation splits skip any question that also appears among the first
    ``exclude_train`` train-seed items (generated seeds differ, but small templates can
    still produce the same text), and ``steps`` (default true): write step-by-step
    solutions from ``expression`` metadata; false trains on bare answers.
    """

    default_split = "test"
    train_seed = TRAIN_SEED
    eval_seed = EVAL_SEED

    def __init__(
        self,
        name: str,
        size: int | None = None,
        config: dict[str, Any] | None = None,
        exclude_train: int = 0,
        steps: bool = True,
    ):
        _check_name(name)
        if config is not None and not isinstance(config, dict):
            raise MemgenError(
                f"task option config of gym:{name} must be a mapping of the dataset's settings, "
                f"e.g. config={{min_terms: 2, max_terms: 3}}; got {config!r}."
            )
        self.gym_name = name
        self.name = f"gym:{name}"
        self.size = size
        self.config = dict(config or {})
        self.exclude_train = exclude_train
        self.steps = steps
        self._scorer = None
        self._train_cache: set[str] | None = None

    def _config_error(self, message: str) -> MemgenError:
        return MemgenError(
            f"cannot build reasoning_gym dataset {self.gym_name!r} with config "
            f"{self.config}: {message}"
        )

    def _dataset(self, seed: int, size: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.gym_name, seed=seed, size=size, **self.config)
        except _CONFIG_ERRORS as e:
            raise self._config_error(str(e)) from None

    def _entries(self, seed: int, size: int) -> list[dict]:
        """Items ``0 .. size-1`` of the dataset at ``seed``, the same in every process.

        Some generators iterate over a set of strings (ransom_note draws its letters from
        ``list(set_of_letters)``), so what they draw depends on Python's string hash seed,
        which differs per process unless ``PYTHONHASHSEED`` fixes it. Items are therefore
        always the ones drawn with hash randomization off: in this process when it runs with
        ``PYTHONHASHSEED=0``, else in a child process that does (about 1 s to import
        reasoning_gym; each set is generated once per process).
        """
        if sys.flags.hash_randomization == 0:
            dataset = self._dataset(seed, size)
            return [dataset[i] for i in range(len(dataset))]
        config = json.dumps(self.config, sort_keys=True)
        status, payload = pickle.loads(_generated(self.gym_name, seed, size, config))
        if status == "config":
            raise self._config_error(payload)
        return payload

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        default_seed = self.seed_for(split)  # also rejects unknown splits
        seed = default_seed if seed is None else seed
        kind = "train" if split == "train" else "eval"
        want = limit if limit is not None else self.size or DEFAULT_SIZE[kind]
        if want < 0:
            raise MemgenError(f"limit must be >= 0, got {want}")
        if want == 0:
            return []
        exclude = self._train_questions() if split != "train" and seed != self.train_seed else set()
        # A few spare items make up for the ones dropped as duplicates of train questions.
        entries = self._entries(seed, want + (want // 10 + 16 if exclude else 0))
        examples = []
        for index, entry in enumerate(entries):
            if len(examples) == want:
                break
            if entry["question"] not in exclude:
                examples.append(self._example(entry, seed, index))
        return examples

    def _train_questions(self) -> set[str]:
        if self.exclude_train <= 0:
            return set()
        if self._train_cache is None:
            entries = self._entries(self.train_seed, self.exclude_train)
            self._train_cache = {entry["question"] for entry in entries}
        return self._train_cache

    def _example(self, entry: dict, seed: int, index: int) -> Example:
        metadata = entry.get("metadata", {})
        answer = str(entry["answer"])
        solution = metadata.get("answer_cot")
        if solution is None and self.steps and metadata.get("expression"):
            solution = worked_solution(str(metadata["expression"]), answer)
        return Example(
            id=f"{self.name}/{seed}/{index}",
            question=entry["question"],
            answer=answer,
            solution=solution or answer,
            meta={"seed": seed, "index": index, "metadata": metadata},
        )

    def extract(self, completion: str, example: Example | None = None) -> str | None:
        if example is not None and to_number(example.answer) is not None:
            return extract_math_answer(completion)
        return extract_gym_answer(completion)

    def grade(self, completion: str, example: Example) -> float:
        return self.grade_checked(completion, example)[0]

    def grade_checked(self, completion: str, example: Example) -> tuple[float, str | None]:
        """``grade`` and, where reasoning_gym's scorer raised, what it raised (the answer then
        scores 0.0): ``"<example id>: <exception type>: <message>"``, else None."""
        if to_number(example.answer) is not None:
            return float(numeric_equal(self.extract(completion, example), example.answer)), None
        if self._scorer is None:
            self._scorer = self._dataset(self.train_seed, 1).score_answer
        entry = {
            "question": example.question,
            "answer": example.answer,
            "metadata": example.meta.get("metadata", {}),
        }
        try:
            score = float(self._scorer(self.extract(completion), entry))
        except Exception as exc:  # counted by the callers; too many stop the run
            return 0.0, f"{example.id}: {type(exc).__name__}: {exc}"
        # partial credit is not a solved problem
        return (1.0 if score >= 1.0 - 1e-9 else 0.0), None


class GSMSymbolicTask(GymTask):
    """``gsm_symbolic``: GSM8K-style problems with a worked solution ending in ``#### N``.

    Graded like GSM8K (1.0 or 0.0 on the final number), not by reasoning_gym's scorer: that
    one reads the *first* number of the answer and gives 0.01 for any wrong number, which
    would inflate accuracy and misread "1,250". Evaluation splits exclude questions that
    occur among the first 10,000 train-seed items.
    """

    def __init__(
        self,
        size: int | None = None,
        config: dict[str, Any] | None = None,
        exclude_train: int = 10_000,
    ):
        super().__init__("gsm_symbolic", size=size, config=config, exclude_train=exclude_train)
        self.name = "gsm_symbolic"

    def _example(self, entry: dict, seed: int, index: int) -> Example:
        example = super()._example(entry, seed, index)
        example.id = f"gsm_symbolic/{seed}/{index}"
        return example

    def extract(self, completion: str, example: Example | None = None) -> str | None:
        return extract_math_answer(completion)


# --------------------------------------------------------------------------- grader errors


def grade_checked(task: Task, completion: str, example: Example) -> tuple[float, str | None]:
    """Any task's grade, with the scorer exception a reasoning_gym task caught (else None)."""
    if isinstance(task, GymTask):
        return task.grade_checked(completion, example)
    return float(task.grade(completion, example)), None


@dataclass
class GraderErrors:
    """The scorer exceptions of one run of a task: how many answers were graded, which raised.

    >>> tally = GraderErrors(graded=100, errors=["t/0: KeyError: 'x'"] * 2)
    >>> tally.check("gym:demo")  # 2 of 100: under the tolerance
    >>> tally.graded, tally.errors = 100, tally.errors * 2
    >>> tally.check("gym:demo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memgen_cli.errors.MemgenError: the grader of gym:demo raised on 4 of 100 answers ...
    """

    graded: int = 0
    errors: list[str] = field(default_factory=list)  # grade_checked's messages, in order

    def add(self, error: str | None) -> None:
        self.graded += 1
        if error is not None:
            self.errors.append(error)

    def check(self, task: str) -> None:
        """Raise MemgenError where the errors pass the tolerance (``MAX_GRADER_ERROR_RATE`` of
        the answers graded, and at least ``MIN_GRADER_ERRORS``)."""
        n = len(self.errors)
        if n < MIN_GRADER_ERRORS or n <= MAX_GRADER_ERROR_RATE * self.graded:
            return
        raise MemgenError(
            f"the grader of {task} raised on {n} of {self.graded} answers (more than "
            f"{MAX_GRADER_ERROR_RATE:.0%}), so its zeros say nothing about the model; the "
            f"first: {self.errors[0]}. Check the task's config and the installed reasoning_gym "
            "(requirements/lock.txt pins the tested version; `make setup` installs it)."
        )
