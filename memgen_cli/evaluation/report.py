"""What an eval leaves: ``metrics.json`` and ``predictions.jsonl`` (written whole, or not at
all), the results table, and the table of the first problems with each row's answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from memgen_cli.evaluation.plan import display_name
from memgen_cli.outputs import atomic_dir


def write_outputs(out: Path, metrics: dict, predictions: list[dict]) -> None:
    """The output folder, written whole in a temporary folder and swapped in: an interrupted run
    leaves the old one or the new one, never half of either."""
    with atomic_dir(out, "eval") as tmp:
        (tmp / "predictions.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8"
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def results_table(
    results: list[dict], seconds: float, out: Path, warnings: list[str] | None = None
) -> Table:
    caption = f"insertions: mean per answer · {seconds:.0f} s in all · written to {out}"
    if any(r.get("vs_first") for r in results):
        caption += "\nΔ: paired difference to the task's first row ± s.e., exact McNemar p"
    caption += "".join(f"\n[yellow]warning:[/] {text}" for text in warnings or [])
    table = Table(title="memgen eval", caption=caption)
    labels = short_labels([r.get("artifact") for r in results])
    artifacts = len(set(labels.values())) > 1
    paired_rows = any(r.get("vs_first") for r in results)
    errors = any(r.get("grader_errors") for r in results)  # scorer exceptions, scored 0
    names = ["task", *(["artifact"] if artifacts else []), "mode", "accuracy %", "n"]
    names += ["insertions", "samples/s", "tokens/s", *(["grader errors"] if errors else [])]
    names += ["Δ vs first"] if paired_rows else []
    for name in names:
        table.add_column(name, justify="left" if name in ("task", "artifact", "mode") else "right")
    for r in results:
        accuracy = f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}"
        speeds = [_rate(r["samples_per_s"], 2), _rate(r["tokens_per_s"], 1)]
        row = [display_name(r["task"]), *([labels[r.get("artifact")]] if artifacts else [])]
        row += [r["mode"], accuracy, str(r["n"]), f"{r['mean_insertions']:.2f}", *speeds]
        row += [str(r.get("grader_errors", 0))] if errors else []
        if paired_rows:
            v = r.get("vs_first")
            row.append(
                "-"
                if v is None
                else f"{100 * v['diff']:+.1f}±{100 * v['diff_stderr']:.1f} p={v['mcnemar_p']:.2g}"
            )
        table.add_row(*row)
    return table


def examples_table(predictions: list[dict], n: int) -> Table:
    """The first ``n`` problems of each task, in problem order (not picked by outcome): the
    question, the gold answer, and per row of the results table the answer it gave, ✓ or ✗."""
    rows = list(dict.fromkeys((p.get("artifact"), p["mode"]) for p in predictions))
    labels = short_labels([artifact for artifact, _ in rows])
    several = len({artifact for artifact, _ in rows}) > 1
    table = Table(
        title=f"the first {n} problems of each task",
        caption="each row's answer as the grader read it: ✓ right, ✗ wrong, ∅ none found",
    )
    for name in ("task", "#", "question", "gold"):
        table.add_column(
            name, justify="right" if name == "#" else "left", no_wrap=name != "question"
        )
    for artifact, mode in rows:
        table.add_column(f"{labels[artifact]} · {mode}" if several else mode, no_wrap=True)
    by = {(p["task"], p.get("artifact"), p["mode"], p["index"]): p for p in predictions}
    for task in dict.fromkeys(p["task"] for p in predictions):
        for index in sorted({p["index"] for p in predictions if p["task"] == task})[:n]:
            shown = [by.get((task, artifact, mode, index)) for artifact, mode in rows]
            first = next(p for p in shown if p is not None)
            question = " ".join(first["prompt"].split())
            cells = [_answer_cell(p) for p in shown]
            table.add_row(display_name(task), str(index), question, str(first["gold"]), *cells)
    return table


def _answer_cell(p: dict | None) -> str:
    if p is None:
        return "-"
    answer = "∅" if p["extracted"] in (None, "") else str(p["extracted"])
    return f"{'✓' if p['correct'] else '✗'} {answer}"


def short_labels(paths: list[str | None]) -> dict[str | None, str]:
    """Each artifact path's display name: its last components, as few as keep them apart.

    >>> short_labels(["runs/a/sft", "runs/b/sft", "runs/lora", None])
    {'runs/a/sft': 'a/sft', 'runs/b/sft': 'b/sft', 'runs/lora': 'lora', None: 'plain'}
    """
    unique = list(dict.fromkeys(paths))
    parts = {p: Path(p).parts if p else ("plain",) for p in unique}
    out: dict[str | None, str] = {}
    for p in unique:
        for k in range(1, len(parts[p]) + 1):
            tail = parts[p][-k:]
            if all(q == p or parts[q][-k:] != tail for q in unique):
                break
        out[p] = "/".join(tail)
    return out


def _rate(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
