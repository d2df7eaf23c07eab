"""GPQA (diamond): graduate-level multiple choice, graded by the chosen letter.

From the hub (``Idavidrein/gpqa``, config ``gpqa_diamond``; gated: accept its terms and log
in) or from local JSONL with the hub's columns ``Question``, ``Correct Answer`` and
``Incorrect Answer 1`` .. ``3``. The four options are shuffled deterministically from the
seed and the record, and listed as A) .. D) under the question.
"""

from __future__ import annotations

import random

from memgen_cli.data.base import Example, HubTask, select
from memgen_cli.data.extraction import extract_choice_letter

HUB_ID, HUB_CONFIG = "Idavidrein/gpqa", "gpqa_diamond"
LETTERS = "ABCD"
COLUMNS = (
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
)


class GPQATask(HubTask):
    """GPQA diamond. The hub has one split, ``train`` (198 questions), used for evaluation.

    ``seed`` (default ``eval_seed``) sets the option order only; examples keep file order
    and ``limit`` takes the first ones.
    """

    name = "gpqa"
    default_split = "train"
    eval_seed = 0
    hub_id, hub_config = HUB_ID, HUB_CONFIG
    columns = COLUMNS
    hint = (
        "Or use a local copy: --data gpqa --task-option path=path/to/gpqa.jsonl with the columns "
        + ", ".join(COLUMNS)
        + "."
    )

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        rows, _ = self.rows(split or self.default_split)
        seed = self.eval_seed if seed is None else seed
        return select([self._example(row, i, seed) for i, row in enumerate(rows)], limit, None)

    @staticmethod
    def _example(row: dict, index: int, seed: int) -> Example:
        record = str(row.get("Record ID") or index)
        options = [str(row[c]).strip() for c in COLUMNS[1:]]
        order = list(range(4))
        # A string seed is hashed stably (unlike hash()), so the order survives restarts.
        random.Random(f"{seed}:{record}").shuffle(order)
        shuffled = [options[i] for i in order]
        letter = LETTERS[order.index(0)]
        listing = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(shuffled))
        return Example(
            id=f"gpqa/{record}",
            question=f"{str(row['Question']).strip()}\n\n{listing}",
            answer=letter,
            solution=None,
            meta={"choices": shuffled, "correct": options[0], "seed": seed},
        )

    def extract(self, completion: str) -> str | None:
        return extract_choice_letter(completion, LETTERS)

    def grade(self, completion: str, example: Example) -> float:
        return float(self.extract(completion) == example.answer)
