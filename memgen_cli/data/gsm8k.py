"""GSM8K: grade-school maths word problems, graded by the final number.

From the hub (``openai/gsm8k``, config ``main``, splits ``train``/``test``) or from local
JSONL with ``question`` and ``answer`` columns, where ``answer`` is a worked solution ending
in ``#### N``. The example's ``solution`` is that text with the ``<<48/2=24>>`` calculator
annotations removed; its ``answer`` is ``N``.
"""

from __future__ import annotations

import re

from memgen_cli.data.base import Example, HubTask
from memgen_cli.data.extraction import extract_hash_answer
from memgen_cli.data.graders import numeric_equal
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


class GSM8KTask(HubTask):
    """GSM8K; ``path`` is a ``.jsonl`` file (used for any split) or a directory holding
    ``{split}.jsonl``. Without ``path`` the data comes from the hub."""

    name = "gsm8k"
    default_split = "test"
    hub_id, hub_config = HUB_ID, HUB_CONFIG
    columns = ("question", "answer")
    hint = (
        "Use a local copy instead: --data path/to/test.jsonl (GSM8K JSONL with "
        "'question' and 'answer'), or the offline task gsm_symbolic."
    )

    def hub_rows(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise MemgenError(f"gsm8k has splits {', '.join(SPLITS)}; got {split!r}.")
        return super().hub_rows(split)

    def example(self, row: dict, split: str, index: int, source: str) -> Example:
        example = gsm8k_example(row, f"gsm8k/{split}/{index}")
        if not example.answer:
            raise MemgenError(
                f"{source}: record {index + 1} has no final answer: the 'answer' text "
                "must end with a line '#### <number>'."
            )
        return example

    def grade(self, completion: str, example: Example) -> float:
        return float(numeric_equal(self.extract(completion), example.answer))
