"""TriviaQA (no context): open-domain questions, graded by exact match against aliases.

From the hub (``mandarjoshi/trivia_qa``, config ``rc.nocontext``; evaluation on
``validation``, since ``test`` has no answers) or from local JSONL with ``question`` and
either ``answer.aliases`` (the hub's layout) or ``answers`` (a list of strings).
"""

from __future__ import annotations

from pathlib import Path

from memgen_cli.data.base import (
    Example,
    Task,
    has_field,
    load_hub,
    local_split_file,
    read_jsonl,
    require_columns,
    select,
)
from memgen_cli.data.graders import extract_final_answer, qa_exact_match
from memgen_cli.errors import MemgenError

HUB_ID, HUB_CONFIG = "mandarjoshi/trivia_qa", "rc.nocontext"


def _aliases(row: dict) -> list[str]:
    if has_field(row, "answer.aliases"):
        answer = row["answer"]
        return [answer.get("value", ""), *answer["aliases"]]
    answers = row.get("answers")
    if answers is None:
        return []
    return [answers] if isinstance(answers, str) else list(answers)


class TriviaQATask(Task):
    """TriviaQA ``rc.nocontext``, or a local file (``path``: ``.jsonl`` or directory)."""

    name = "triviaqa"
    default_split = "validation"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        rows, source = self._rows(split)
        require_columns(rows, ["question"], source)
        examples = []
        for index, row in enumerate(rows):
            aliases = [a for a in dict.fromkeys(_aliases(row)) if a]
            if not aliases:
                raise MemgenError(
                    f"{source}: record {index + 1} has no answers: give 'answer.aliases' "
                    f"or 'answers' (columns found: {', '.join(sorted(row))})."
                )
            examples.append(
                Example(
                    id=str(row.get("question_id") or f"triviaqa/{split}/{index}"),
                    question=row["question"].strip(),
                    answer=aliases[0],
                    solution=None,
                    meta={"aliases": aliases},
                )
            )
        return select(examples, limit, seed)

    def _rows(self, split: str) -> tuple[list[dict], str]:
        if self.path is not None:
            file = local_split_file(self.path, split)
            return read_jsonl(file), str(file)
        hint = "Use a local copy instead: --data triviaqa --task-option path=path/to/triviaqa.jsonl (question, answers)."
        return load_hub(HUB_ID, HUB_CONFIG, split, hint), f"{HUB_ID}:{split}"

    def extract(self, completion: str) -> str | None:
        return extract_final_answer(completion)

    def grade(self, completion: str, example: Example) -> float:
        aliases = example.meta.get("aliases") or [example.answer]
        return float(qa_exact_match(self.extract(completion), aliases))
