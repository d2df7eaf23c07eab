"""KodCode: Python programming problems graded by running their pytest tests.

From the hub (``KodCode/KodCode-Light-RL-10K``) or from local JSONL with ``question``,
``test`` (pytest code that does ``from solution import ...``), and optionally
``test_info`` (``[{"function_name": ...}]``) and ``solution``. The completion's last
```` ```python ```` block is run against the tests in :mod:`memgen_cli.data.sandbox`;
``--task-option sandbox=strict`` refuses to grade without every isolation layer.
"""

from __future__ import annotations

import importlib.util
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
from memgen_cli.data.sandbox import require_isolation, run_python_tests
from memgen_cli.errors import MemgenError

HUB_ID = "KodCode/KodCode-Light-RL-10K"
# The hub has a single split; every 20th row (5 %) is held out as "test".
TEST_EVERY = 20
_FENCE = re.compile(r"```[ \t]*(\w*)[ \t]*\n(.*?)```", re.S)


def extract_code(completion: str) -> str | None:
    """The last ```` ```python ```` block, else the last fenced block of any kind, else None."""
    blocks = _FENCE.findall(completion or "")
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    chosen = python or [body for _, body in blocks]
    return chosen[-1] if chosen else None


def _function_names(row: dict) -> list[str]:
    info = row.get("test_info") or []
    return [i["function_name"] for i in info if isinstance(i, dict) and i.get("function_name")]


class KodCodeTask(Task):
    """KodCode-Light-RL-10K, or a local file (``path``: ``.jsonl`` or directory).

    ``answer`` holds the test code. When ``test_info`` names the function(s) the tests
    import, the question says so: without the name, a correct program can fail the import.
    ``timeout`` (wall-clock seconds) and ``memory_mb`` bound each test run. ``sandbox``:
    ``best-effort`` (default) runs with whatever isolation this machine gives and says once
    which layers are missing; ``strict`` refuses to run unless it gives all of them (see
    :mod:`memgen_cli.data.sandbox`).
    """

    name = "kodcode"
    default_split = "test"

    def __init__(
        self,
        path: str | Path | None = None,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        sandbox: str = "best-effort",
    ):
        if importlib.util.find_spec("pytest") is None:
            raise MemgenError("grading kodcode runs pytest; install it: pip install pytest")
        require_isolation(sandbox)
        self.path = Path(path) if path is not None else None
        self.timeout = timeout
        self.memory_mb = memory_mb

    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        rows, source = self._rows(split)
        require_columns(rows, ["question", "test"], source)
        examples = [self._example(row, split, i) for i, row in enumerate(rows)]
        return select(examples, limit, seed)

    def _rows(self, split: str) -> tuple[list[dict], str]:
        if self.path is not None:
            file = local_split_file(self.path, split)
            return read_jsonl(file), str(file)
        if split not in ("train", "test"):
            raise MemgenError(f"kodcode has splits train, test; got {split!r}.")
        hint = "Use a local copy instead: --data kodcode --task-option path=path/to/kodcode.jsonl (question, test)."
        rows = load_hub(HUB_ID, None, "train", hint)
        held_out = split == "test"
        rows = [row for i, row in enumerate(rows) if (i % TEST_EVERY == 0) == held_out]
        return rows, f"{HUB_ID}:{split}"

    @staticmethod
    def _example(row: dict, split: str, index: int) -> Example:
        question = row["question"].strip()
        names = _function_names(row)
        if names:
            question += f"\n\nNote that the output function should be {', '.join(names)}."
        solution = row.get("solution")
        return Example(
            id=str(row.get("question_id") or f"kodcode/{split}/{index}"),
            question=question,
            answer=row["test"],
            solution=f"```python\n{solution.strip()}\n```" if solution else None,
            meta={"function_names": names},
        )

    def extract(self, completion: str) -> str | None:
        return extract_code(completion)

    def grade(self, completion: str, example: Example) -> float:
        code = self.extract(completion)
        if code is None:
            return 0.0
        result = run_python_tests(
            code, example.answer, timeout=self.timeout, memory_mb=self.memory_mb
        )
        return float(result.passed)
