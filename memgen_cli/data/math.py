"""MATH: competition mathematics with LaTeX answers, graded by normalised equality.

From the hub (``HuggingFaceH4/MATH-500``, its single split ``test``) or from local JSONL
with ``problem`` and ``solution`` and, optionally, ``answer`` (otherwise the last
``\\boxed{}`` of the solution).
"""

from __future__ import annotations

from memgen_cli.data.base import Example, HubTask
from memgen_cli.data.extraction import extract_boxed
from memgen_cli.errors import MemgenError

HUB_ID = "HuggingFaceH4/MATH-500"


class MathTask(HubTask):
    """MATH-500 or a local MATH-format file (``path``: a ``.jsonl`` or a directory)."""

    name = "math"
    default_split = "test"
    hub_id = HUB_ID
    columns = ("problem", "solution")
    hint = "Use a local copy instead: --data math --task-option path=path/to/math.jsonl (problem, solution, answer)."

    def hub_rows(self, split: str) -> list[dict]:
        if split != "test":
            raise MemgenError(f"{HUB_ID} has only the split 'test'; got {split!r}.")
        return super().hub_rows(split)

    def example(self, row: dict, split: str, index: int, source: str) -> Example:
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
