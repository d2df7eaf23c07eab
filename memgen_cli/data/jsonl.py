"""Any JSONL file as a task: name the columns, pick a grader.

``columns`` maps roles to column names (dotted names reach into objects):
``prompt`` (default ``question``), ``answer`` (default ``answer``), and optionally
``solution`` (the SFT target) and ``id``. ``grader`` is one of ``exact``, ``numeric``,
``boxed``, ``contains`` (see ``graders.py``).
"""

from __future__ import annotations

from pathlib import Path

from memgen_cli.data.base import (
    Example,
    Task,
    get_field,
    local_split_file,
    read_jsonl,
    require_columns,
    select,
)
from memgen_cli.data.graders import EXTRACTORS, GRADERS
from memgen_cli.errors import MemgenError, did_you_mean

ROLES = ("prompt", "answer", "solution", "id")
DEFAULT_COLUMNS = {"prompt": "question", "answer": "answer"}


class JsonlTask(Task):
    """A generic local task; ``path`` is a ``.jsonl`` file or a directory of ``{split}.jsonl``."""

    name = "jsonl"
    default_split = "test"

    def __init__(
        self,
        path: str | Path | None = None,
        columns: dict[str, str] | None = None,
        grader: str = "exact",
    ):
        if path is None:
            raise MemgenError("the jsonl task needs a data file: pass --data path/to/file.jsonl.")
        for role in columns or {}:
            if role not in ROLES:
                raise MemgenError(
                    f"unknown column role {role!r}; roles are {', '.join(ROLES)}."
                    + did_you_mean(role, ROLES)
                )
        if grader not in GRADERS:
            raise MemgenError(
                f"unknown grader {grader!r}; graders are {', '.join(GRADERS)}."
                + did_you_mean(grader, GRADERS)
            )
        self.path = Path(path)
        self.columns = {**DEFAULT_COLUMNS, **(columns or {})}
        self.grader = grader

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        file = local_split_file(self.path, split)
        rows = read_jsonl(file)
        require_columns(rows, list(self.columns.values()), file)
        examples = [self._example(row, split, i) for i, row in enumerate(rows)]
        return select(examples, limit, seed)

    def _example(self, row: dict, split: str, index: int) -> Example:
        c = self.columns
        solution = get_field(row, c["solution"]) if "solution" in c else None
        return Example(
            id=str(get_field(row, c["id"])) if "id" in c else f"{self.path.stem}/{split}/{index}",
            question=str(get_field(row, c["prompt"])),
            answer=str(get_field(row, c["answer"])),
            solution=None if solution is None else str(solution),
            meta={},
        )

    def extract(self, completion: str) -> str | None:
        return EXTRACTORS[self.grader](completion)

    def grade(self, completion: str, example: Example) -> float:
        return GRADERS[self.grader](completion, example.answer)
