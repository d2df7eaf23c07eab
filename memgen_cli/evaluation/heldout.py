"""Eval data kept apart from training data: the data seed of a generated task is moved past
the range its artifact trained on, and a score that is not held out says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from memgen_cli.data import Task
from memgen_cli.evaluation.plan import display_name

# When the artifact records a train seed but not how many items it drew, assume this many
# (reasoning_gym item i comes from Random(seed + i), so a seed names a range of generators).
ASSUMED_GYM_RANGE = 100_000

# What `memgen sft-weaver` records in ``manifest["training"]``: every item it drew counts.
_DRAWN = ("samples", "dropped_too_long", "heldout_samples", "heldout_dropped_too_long")


def _recorded_train_data(manifest: dict | None, task: Task) -> tuple[int, int | None] | None:
    """(generator seed, items drawn) of the artifact's training data, if it was this task.

    Reads the training summary of the manifest: ``task``, ``data_seed`` and the sample counts.
    """
    training = (manifest or {}).get("training") or {}
    if training.get("task") != task.name or training.get("data_seed") is None:
        return None
    drawn = sum(int(training.get(key) or 0) for key in _DRAWN)
    return int(training["data_seed"]), drawn or None


def data_seed(
    task: Task, seed: int | None, limit: int | None, manifest, notes: Console
) -> int | None:
    """The seed for ``task.load``: the user's, else (generated tasks) a held-out eval seed.

    ``manifest`` is one artifact's manifest, a list of them, or None. reasoning_gym item i is
    drawn from Random(seed + i), so train and eval overlap when their seed ranges do. The
    task's default eval seed is moved past every artifact's recorded train range that it
    would meet; a user-given seed that meets one gets a warning.
    """
    if task.train_seed is None:  # fixed data: the seed shuffles (or orders options)
        return task.eval_seed if seed is None else seed
    manifests = manifest if isinstance(manifest, list) else [manifest]
    recorded = [r for m in manifests if (r := _recorded_train_data(m, task)) is not None]
    if recorded:
        task.train_seed = recorded[0][0]  # the duplicate-question filter reads a real train set
    start = task.eval_seed if seed is None else seed
    ranges = [(lo, lo + (drawn or ASSUMED_GYM_RANGE)) for lo, drawn in recorded]

    def meets(s: int) -> tuple[int, int] | None:
        return next(
            (r for r in ranges if s < r[1] and r[0] < s + (limit or ASSUMED_GYM_RANGE)), None
        )

    hit = meets(start)
    if hit is not None and seed is not None:
        notes.print(
            f"[yellow]warning:[/] --seed {seed} draws {task.name} problems from the same "
            f"generator range as the artifact's training data (seed {hit[0]}); results may be inflated."
        )
        return start
    moved = start
    while hit is not None:
        lo, moved = hit
        hit = meets(moved)
    if moved != start:
        notes.print(
            f"{task.name}: eval seed moved to {moved}, past the artifact's train range [{lo}, {moved})."
        )
    return moved


# --------------------------------------------------------------------------- contamination
# reasoning_gym's gsm_symbolic templates were written from GSM8K *test* problems (e.g. "Emily
# can peel 6 shrimp", "Sunny is selling gingerbread"): a model trained on it has seen GSM8K
# test in disguise, so its GSM8K test score is not a held-out score.
GSM8K_TEST_SOURCES = ("gsm_symbolic", "gym:gsm_symbolic")


def trained_tasks(manifest: dict | None) -> list[str]:
    """The tasks an artifact and its ancestors (when still on disk) were trained on."""
    tasks, seen = [], 0
    while manifest and seen < 16:  # a parent chain longer than this is not a real lineage
        task = (manifest.get("training") or {}).get("task")
        if task:
            tasks.append(task)
        parent = (manifest.get("parent") or {}).get("name")
        try:
            manifest = json.loads((Path(parent) / "memgen.json").read_text()) if parent else None
        except (OSError, ValueError):
            manifest = None
        seen += 1
    return tasks


def is_gsm8k_test(task: Task, split: str | None) -> bool:
    """Whether ``task`` reads GSM8K's test set: the hub's (or a directory's) test split, or
    a GSM8K-format file whose name says test (a single file is used for any split)."""
    if task.name != "gsm8k":
        return False
    path = getattr(task, "path", None)
    if path is None or Path(path).is_dir():
        return (split or task.default_split) == "test"
    return "test" in Path(path).stem.lower()


def contamination_warnings(
    manifest: dict | None, artifact, tasks: dict[str, Task], split: str | None
) -> list[str]:
    """One warning per (artifact trained on gsm_symbolic, GSM8K test task) pair."""
    sources = [t for t in trained_tasks(manifest) if t in GSM8K_TEST_SOURCES]
    if not sources:
        return []
    return [
        f"{artifact} was trained on {sources[0]}, whose templates were built from GSM8K test "
        f"problems; its score on {display_name(label)} (GSM8K test) is contaminated, not held out. "
        "Evaluate on another task, or train on GSM8K train (--data gsm8k) for a GSM8K score."
        for label, task in tasks.items()
        if is_gsm8k_test(task, split)
    ]
