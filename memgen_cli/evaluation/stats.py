"""The figures of an eval row: accuracy with its standard error, and the paired comparison
with the first row of its task on the same problems (difference ± s.e., exact McNemar p).
"""

from __future__ import annotations

import math

from memgen_cli.data import Task


def summarize(
    label: str, task: Task, mode: str, records: list[dict], seconds: float, grade_s: float
) -> dict:
    n = len(records)
    scores = [float(r["score"] >= 1.0) for r in records]  # solved only at full score
    accuracy = sum(scores) / n
    var = sum((s - accuracy) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    tokens = sum(r["num_tokens"] for r in records)
    inference = sum(1 for r in records for i in r["insertions"] if i["kind"] == "inference")
    return {
        "task": label,
        "task_family": task.name,
        "mode": mode,
        "accuracy": accuracy,
        "stderr": math.sqrt(var / n),
        "n": n,
        "mean_insertions": sum(len(r["insertions"]) for r in records) / n,
        "mean_inference_insertions": inference / n,
        "mean_tokens": tokens / n,
        "finished": sum(r["finished"] for r in records) / n,
        "samples_per_s": n / seconds if seconds > 0 else None,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "generate_s": round(seconds, 3),
        "grade_s": round(grade_s, 3),
        "grader_errors": sum(1 for r in records if r.get("grader_error")),
    }


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: ``b`` problems only the first row solved, ``c`` only the
    other; under no difference each discordant problem is a fair coin (binomial(b + c, 1/2)).

    >>> mcnemar_p(0, 0), mcnemar_p(1, 4), round(mcnemar_p(2, 10), 5)
    (1.0, 0.375, 0.03857)
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired(reference: list[bool], other: list[bool]) -> dict:
    """Paired comparison on the same problems: difference in accuracy (other - reference) with
    its standard error (of the per-problem differences), and the exact McNemar p-value."""
    n = len(reference)
    d = [int(o) - int(r) for r, o in zip(reference, other, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    b = sum(1 for x in d if x < 0)  # only the reference solved it
    c = sum(1 for x in d if x > 0)  # only the other row solved it
    return {
        "diff": mean,
        "diff_stderr": math.sqrt(var / n),
        "reference_only": b,
        "row_only": c,
        "mcnemar_p": mcnemar_p(b, c),
    }


def add_paired(results: list[dict], predictions: list[dict]) -> None:
    """Each row gets ``vs_first``: the paired figure against the first row of its task."""
    correct: dict[tuple, dict[int, bool]] = {}
    for p in predictions:
        correct.setdefault((p["task"], p.get("artifact"), p["mode"]), {})[p["index"]] = p["correct"]
    first: dict[str, dict] = {}
    for row in results:
        ref = first.setdefault(row["task"], row)
        if ref is row:
            row["vs_first"] = None
            continue
        a = correct[(ref["task"], ref["artifact"], ref["mode"])]
        b = correct[(row["task"], row["artifact"], row["mode"])]
        if sorted(a) != sorted(b):  # never expected: every row runs the same problems
            raise RuntimeError(f"rows of {row['task']} ran different problems")
        ids = sorted(a)
        figure = paired([a[i] for i in ids], [b[i] for i in ids])
        row["vs_first"] = {"artifact": ref["artifact"], "mode": ref["mode"], **figure}
