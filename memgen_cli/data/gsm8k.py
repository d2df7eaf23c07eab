"""GSM8K: grade-school maths word problems, graded by the final number.

From the hub (``openai/gsm8k``, config ``main``, splits ``train``/``test``) or from local
JSONL with ``question`` and ``answer`` columns, where ``answer`` is a worked solution ending
in ``#### N``. The example's ``solution`` is that text with the ``<<48/2=24>>`` calculator
annotations removed; its ``answer`` is ``N``.
"""

from __future__ import annotations

import re
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
from memgen_cli.data.graders import extract_hash_answer, extract_math_answer, numeric_equal
from memgen_cli.errors import MemgenError

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
SPLITS = ("train", "test")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_example(row: dict, id_: str) -> Example:
    """An Example from a GSM8K record (``question``, ``answer`` with ``#### N``)."""
    solution = _CALCULATOR.sub("", row["answer"]).strip()
    gold = extract_hash_answer(solution)
    return Example(
        id=id_,
        question=row["question"].strip(),
        answer=(gold or "").replace(",", ""),
        solution=solution,
        meta={},
    )


class GSM8KTask(Task):
    """GSM8K; ``path`` is a ``.jsonl`` file (used for any split) or a directory holding
    ``{split}.jsonl``. Without ``path`` the data comes from the hub."""

    name = "gsm8k"
    default_split = "test"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        rows, source = self._rows(split)
        require_columns(rows, ["question", "answer"], source)
        examples = []
        for index, row in enumerate(rows):
            example = gsm8k_example(row, f"gsm8k/{split}/{index}")
            if not example.answer:
                raise MemgenError(
                    f"{source}: record {index + 1} has no final answer: the 'answer' text "
                    "must end with a line '#### <number>'."
                )
            examples.append(example)
        return select(examples, limit, seed)

    def _rows(self, split: str) -> tuple[list[dict], str]:
        if self.path is not None:
            file = local_split_file(self.path, split)
            return read_jsonl(file), str(file)
        if split not in SPLITS:
            raise MemgenError(f"gsm8k has splits {', '.join(SPLITS)}; got {split!r}.")
        hint = (
            "Use a local copy instead: --data path/to/test.jsonl (GSM8K JSONL with "
            "'question' and 'answer'), or the offline task gsm_symbolic."
        )
        return load_hub(HUB_ID, HUB_CONFIG, split, hint), f"{HUB_ID}:{split}"

    def extract(self, completion: str) -> str | None:
        return extract_math_answer(completion)

    def grade(self, completion: str, example: Example) -> float:
        return float(numeric_equal(self.extract(completion), example.answer))
