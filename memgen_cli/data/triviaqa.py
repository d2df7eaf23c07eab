"""TriviaQA (no context): open-domain questions, graded by exact match against aliases.

From the hub (``mandarjoshi/trivia_qa``, config ``rc.nocontext``; evaluation on
``validation``, since ``test`` has no answers) or from local JSONL with ``question`` and
either ``answer.aliases`` (the hub's layout) or ``answers`` (a list of strings).
"""

from __future__ import annotations

from memgen_cli.data.base import Example, HubTask, has_field
from memgen_cli.data.extraction import extract_final_answer
from memgen_cli.data.graders import qa_exact_match
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


class TriviaQATask(HubTask):
    """TriviaQA ``rc.nocontext``, or a local file (``path``: ``.jsonl`` or directory)."""

    name = "triviaqa"
    default_split = "validation"
    hub_id, hub_config = HUB_ID, HUB_CONFIG
    columns = ("question",)
    hint = "Use a local copy instead: --data triviaqa --task-option path=path/to/triviaqa.jsonl (question, answers)."

    def example(self, row: dict, split: str, index: int, source: str) -> Example:
        aliases = [a for a in dict.fromkeys(_aliases(row)) if a]
        if not aliases:
            raise MemgenError(
                f"{source}: record {index + 1} has no answers: give 'answer.aliases' "
                f"or 'answers' (columns found: {', '.join(sorted(row))})."
            )
        return Example(
            id=str(row.get("question_id") or f"triviaqa/{split}/{index}"),
            question=row["question"].strip(),
            answer=aliases[0],
            solution=None,
            meta={"aliases": aliases},
        )

    def extract(self, completion: str) -> str | None:
        return extract_final_answer(completion)

    def grade(self, completion: str, example: Example) -> float:
        aliases = example.meta.get("aliases") or [example.answer]
        return float(qa_exact_match(self.extract(completion), aliases))
