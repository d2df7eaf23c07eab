"""The task protocol shared by training and evaluation, plus JSONL and hub I/O helpers.

A *task* turns a dataset into :class:`Example` records (``load``), pulls the answer out of a
model completion (``extract``) and scores it (``grade``). Stages only ever see this
interface; one module per task family implements it (``gsm8k.py``, ``gym.py``, ...).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memgen_cli.data.extraction import extract_math_answer
from memgen_cli.data.graders import math_equal
from memgen_cli.errors import MemgenError


@dataclass
class Example:
    """One problem: the prompt text, the gold answer, and an optional worked solution."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base of every task: a name, splits, loading, answer extraction and grading.

    Subclasses override ``load`` and, where the default math grading does not fit,
    ``extract`` and ``grade``. ``grade`` returns 1.0 or 0.0 (a fraction for tasks whose
    own scorer gives partial credit).
    """

    name: str = ""
    default_split: str = "test"
    # Default generator seeds for procedurally generated tasks; None where data is fixed.
    train_seed: int | None = None
    eval_seed: int | None = None

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        raise NotImplementedError

    def seed_for(self, split: str) -> int | None:
        """The generator seed ``split`` draws from (``seeded_split``); None for fixed data."""
        if self.train_seed is None:
            return None
        return seeded_split(self.name, split, self.train_seed, self.eval_seed)

    def extract(self, completion: str) -> str | None:
        return extract_math_answer(completion)

    def grade(self, completion: str, example: Example) -> float:
        return float(math_equal(self.extract(completion), example.answer))


EVAL_SPLITS = ("test", "validation", "eval")
"""The names an evaluation split goes by in the seeded (generated) tasks."""


def seeded_split(task: str, split: str, train_seed: int, eval_seed: int) -> int:
    """The seed a generated task draws ``split`` from: ``train_seed`` for train, ``eval_seed``
    for any of ``EVAL_SPLITS``; another name is an error naming the splits."""
    if split == "train":
        return train_seed
    if split in EVAL_SPLITS:
        return eval_seed
    raise MemgenError(f"{task} has splits train, {', '.join(EVAL_SPLITS)}; got {split!r}.")


def to_messages(
    example: Example, prompt_suffix: str = "", system: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for one example: optional system turn, then question + suffix.

    >>> to_messages(Example("1", "2+2?", "4"), "Put your answer within \\\\boxed{}.")
    [{'role': 'user', 'content': '2+2?\\nPut your answer within \\\\boxed{}.'}]
    """
    content = example.question + ("\n" + prompt_suffix if prompt_suffix else "")
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}]


# --------------------------------------------------------------------------- JSONL files


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; blank lines are skipped.

    Raises MemgenError naming the file (and the 1-based line) for a missing file, text that is
    not UTF-8, an unreadable line, a line that is not an object, or a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise MemgenError(f"data file not found: {path}")
    rows = [row for _, row in jsonl_objects(path)]
    if not rows:
        raise MemgenError(f"{path} is empty: expected one JSON object per line.")
    return rows


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSONL file. Text that is not
    UTF-8, or a line that is not a JSON object, raises MemgenError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MemgenError(f"{path} is not UTF-8 text ({e.reason}).") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemgenError(
                f"{path}: line {lineno} is not valid JSON ({e.msg}); "
                "each line must be one JSON object."
            ) from None
        if not isinstance(value, dict):
            raise MemgenError(
                f"{path}: line {lineno} is a JSON {type(value).__name__}, not an object."
            )
        yield lineno, value


def get_field(row: dict[str, Any], column: str) -> Any:
    """``row[column]``, where ``a.b`` reaches into nested objects; KeyError if absent."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def has_field(row: dict[str, Any], column: str) -> bool:
    try:
        get_field(row, column)
    except KeyError:
        return False
    return True


def require_columns(rows: list[dict[str, Any]], columns: list[str], source: str | Path) -> None:
    """Fail with the file, record, missing column and columns found if any row lacks one."""
    for index, row in enumerate(rows, start=1):
        for column in columns:
            if not has_field(row, column):
                raise MemgenError(
                    f"{source}: record {index} has no column {column!r} "
                    f"(columns found: {', '.join(sorted(row)) or 'none'}). "
                    f"Required columns: {', '.join(columns)}."
                )


def local_split_file(path: str | Path, split: str) -> Path:
    """A local data source: a ``.jsonl`` file is used as is; a directory gives ``{split}.jsonl``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            raise MemgenError(
                f"no {split}.jsonl in {path} (found: {', '.join(found) or 'no .jsonl files'}). "
                f"Pass the file itself, or name the split that exists."
            )
        return candidate
    if not path.is_file():
        raise MemgenError(f"data file not found: {path}")
    return path


def select(rows: list, limit: int | None, seed: int | None) -> list:
    """First ``limit`` rows in file order, or a seeded shuffle of them when ``seed`` is given."""
    if limit is not None and limit < 0:
        raise MemgenError(f"limit must be >= 0, got {limit}")
    if seed is not None:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
    return rows if limit is None else rows[:limit]


# --------------------------------------------------------------------------- hub access


def load_hub(
    dataset_id: str, config: str | None, split: str, hint: str = ""
) -> list[dict[str, Any]]:
    """Rows of one split of a hub dataset; any failure becomes a MemgenError with ``hint``.

    ``datasets`` is imported here, not at module level: it costs about a second and most
    commands (and all offline tasks) never need it.
    """
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, config, split=split)
        return [dict(row) for row in ds]
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        gated = any(w in str(e).lower() for w in ("gated", "401", "403", "authenticat"))
        what = f"{dataset_id}" + (f" (config {config})" if config else "") + f", split {split}"
        why = (
            f"access to {dataset_id} is gated: accept its terms on "
            f"https://huggingface.co/datasets/{dataset_id} and log in (`hf auth login`)"
            if gated
            else "the Hugging Face hub could not be reached or has no such dataset"
        )
        raise MemgenError(f"could not load {what}: {why} [{reason}]. {hint}".strip()) from None


# --------------------------------------------------------------------------- hub tasks


class HubTask(Task):
    """A task read from a hub dataset, or from a local copy of it: ``path``, a ``.jsonl`` file
    (used for any split) or a directory of ``{split}.jsonl``.

    A subclass names its dataset (``hub_id``, ``hub_config``), the ``columns`` every record
    needs and the ``hint`` shown when the hub cannot be read, and turns a record into an
    Example (``example``). It overrides ``hub_rows`` to refuse a split or hold rows out.
    """

    hub_id: str = ""
    hub_config: str | None = None
    columns: tuple[str, ...] = ()
    hint: str = ""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        rows, source = self.rows(split)
        examples = [self.example(row, split, i, source) for i, row in enumerate(rows)]
        return select(examples, limit, seed)

    def rows(self, split: str) -> tuple[list[dict], str]:
        """The records of ``split``, each with every column, and where they came from."""
        if self.path is not None:
            file = local_split_file(self.path, split)
            rows, source = read_jsonl(file), str(file)
        else:
            rows, source = self.hub_rows(split), f"{self.hub_id}:{split}"
        require_columns(rows, list(self.columns), source)
        return rows, source

    def hub_rows(self, split: str) -> list[dict]:
        return load_hub(self.hub_id, self.hub_config, split, self.hint)

    def example(self, row: dict, split: str, index: int, source: str) -> Example:
        """One record as an Example; ``source`` names the file or dataset in errors."""
        raise NotImplementedError
