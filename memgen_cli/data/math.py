"""MATH: competition mathematics with LaTeX answers, graded by normalised equality.

From the hub (``HuggingFaceH4/MATH-500``, its single split ``test``) or from local JSONL
with ``problem`` and ``solution`` and, optionally, ``answer`` (otherwise the last
``\\boxed{}`` of the solution).
"""

from __future__ import annotations

from pathlib import Path

from memgen_cli.data.base import (
    Example,
    Task,
    load_hub,
    local_split_file,
    read_jsonl,
    require_columns,
    select,
)
from memgen_cli.data.graders import extract_boxed, extract_math_answer, math_equal
from memgen_cli.errors import MemgenError

HUB_ID = "HuggingFaceH4/MATH-500"


class MathTask(Task):
    """MATH-500 or a local MATH-format file (``path``: a ``.jsonl`` or a directory)."""

    name = "math"
    default_split = "test"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        rows, source = self._rows(split)
        require_columns(rows, ["problem", "solution"], source)
        examples = [self._example(row, split, i, source) for i, row in enumerate(rows)]
        return select(examples, limit, seed)

    def _rows(self, split: str) -> tuple[list[dict], str]:
        if self.path is not None:
            file = local_split_file(self.path, split)
            return read_jsonl(file), str(file)
        if split != "test":
            raise MemgenError(f"{HUB_ID} has only the split 'test'; got {split!r}.")
        hint = "Use a local copy instead: --data math --task-option path=path/to/math.jsonl (problem, solution, answer)."
        return load_hub(HUB_ID, None, split, hint), f"{HUB_ID}:{split}"

    @staticmethod
    def _example(row: dict, split: str, index: int, source: str) -> Example:
        answer = row.get("answer") or extract_boxed(row["solution"])
        if not answer:
            raise MemgenError(
                f"{source}: record {index + 1} has no 'answer' and its solution has no \\boxed{{}}."
            )
        meta = {k: row[k] for k in ("subject", "level") if k in row}
        return Example(
            id=str(row.get("unique_id") or f"math/{split}/{index}"),
            question=row["problem"].strip(),
            answer=str(answer).strip(),
            solution=row["solution"].strip(),
            meta=meta,
        )

    def extract(self, completion: str) -> str | None:
        return extract_math_answer(completion)

    def grade(self, completion: str, example: Example) -> float:
        return float(math_equal(self.extract(completion), example.answer))
