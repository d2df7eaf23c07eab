"""The "kept" block: what each method keeps of the base model on tasks it was never trained for.

The paper's case for memory over parametric updates is that a frozen reasoner forgets nothing,
while fine-tuning erodes what the model could do before. This block measures it: for every row
(memory off, LoRA-SFT, LoRA-GRPO, the weavers in ``weaver`` mode, weaver + trained trigger in
``full`` mode, and any ``--kept-artifact`` such as a retrieval store), accuracy on tasks unrelated
to the training task, on the same problems for every row, with the paired difference against
memory off (± s.e., exact McNemar p, from ``predictions.jsonl``). A trained trigger that stays
silent on unrelated questions keeps the base model exactly: its insertions per answer and its
difference say whether it does.

1. choose (unless ``--kept-tasks`` names them): memory off (the vanilla row's artifact and
   prompt) answers ``--kept-select-n`` problems of each ``--kept-candidates`` task, drawn with a
   seed of their own (``SELECT_SEED``; the block's problems come from the tasks' held-out default
   seed, so the choice never sees them); the ``--kept-count`` candidates with the highest accuracy
   at or above ``--kept-threshold`` are kept, in candidate order;
2. measure: one ``memgen eval`` per kept task with every row's artifact, ``--kept-n`` problems.

As a block of the table (the rows are the table's, plus ``--kept-artifact NAME=DIR``):

    .venv/bin/python benchmarks/quality.py --table --reuse --kept
    .venv/bin/python benchmarks/quality.py --table --reuse --kept \\
        --kept-artifact retrieval=runs/basic_arithmetic/baseline-retrieval --markdown docs/results.md

Alone, on artifacts already trained (``--row NAME=DIR:MODE``, repeatable; default: the table's
artifacts found under ``--output``), without re-running the table's own evals:

    .venv/bin/python benchmarks/quality_kept.py --output runs/quality \\
        --kept-artifact retrieval=runs/basic_arithmetic/baseline-retrieval --markdown docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from memgen_cli.artifacts import read_manifest
from memgen_cli.config import GenerationConfig
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.stats import paired
from memgen_cli.stages import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py, imported where used

# Offline reasoning_gym tasks with nothing of arithmetic in them: letters, words, logic. Their
# prompts state the answer format themselves where it is not a bare word or number.
CANDIDATES = (
    "gym:letter_counting",
    "gym:syllogism",
    "gym:family_relationships",
    "gym:isomorphic_strings",
    "gym:ransom_note",
    "gym:spell_backward",
    "gym:sentence_reordering",
    "gym:needle_haystack",
)
SELECT_SEED = 2_000_000  # the choice's problems; the block's come from the held-out default seed
MARKERS = ("<!-- quality-kept:begin -->", "<!-- quality-kept:end -->")  # its own block


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The block's options (``quality.py`` adds them to its own, with ``--kept``)."""
    g = p.add_argument_group("kept block (what each row keeps on unrelated tasks)")
    g.add_argument(
        "--kept-tasks",
        default=None,
        metavar="A,B",
        help="the unrelated tasks, comma-separated (skips the choice; default: chosen by "
        "measurement among --kept-candidates)",
    )
    g.add_argument(
        "--kept-candidates",
        default=",".join(CANDIDATES),
        metavar="A,B",
        help=f"tasks the choice measures (default: {', '.join(CANDIDATES)})",
    )
    g.add_argument("--kept-count", type=int, default=3, help="tasks to keep (default 3)")
    g.add_argument(
        "--kept-threshold",
        type=float,
        default=0.10,
        help="least memory-off accuracy of a kept task (default 0.10)",
    )
    g.add_argument(
        "--kept-select-n", type=int, default=100, help="problems per candidate in the choice"
    )
    g.add_argument("--kept-n", type=int, default=200, help="problems per kept task (default 200)")
    g.add_argument(
        "--kept-artifact",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a further row, memory off (e.g. retrieval=runs/x/baseline-retrieval); repeatable",
    )


def check_arguments(p: argparse.ArgumentParser, args) -> None:
    if getattr(args, "kept", False) and not args.table:
        p.error("--kept is a block of the --table; add --table")
    if getattr(args, "kept", False) and args.deep:
        p.error("--kept measures the rows of the paper's table; leave out --deep")
    if args.kept_count < 1 or args.kept_n < 1 or args.kept_select_n < 1:
        p.error("--kept-count, --kept-n and --kept-select-n must be at least 1")
    if not 0.0 <= args.kept_threshold <= 1.0:
        p.error("--kept-threshold is an accuracy between 0 and 1")
    for item in args.kept_artifact:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            p.error(f"--kept-artifact takes NAME=DIR, got {item!r}")


def split(text: str | None) -> list[str]:
    """``"a, b,,a"`` -> ``["a", "b"]``.

    >>> split("gym:a, gym:b,,gym:a")
    ['gym:a', 'gym:b']
    """
    return list(dict.fromkeys(s.strip() for s in (text or "").split(",") if s.strip()))


# --------------------------------------------------------------------------- rows
def block_rows(table: list[dict], extra: list[str]) -> list[dict]:
    """The block's rows: the table's (row, artifact, mode), then each ``NAME=DIR`` of
    ``--kept-artifact`` as a memory-off row, repeats dropped.

    >>> block_rows([{"row": "vanilla", "artifact": "w", "mode": "off"}], ["retrieval=r"])
    [{'row': 'vanilla', 'artifact': 'w', 'mode': 'off'}, {'row': 'retrieval', 'artifact': 'r', 'mode': 'off'}]
    """
    rows = [{k: r[k] for k in ("row", "artifact", "mode")} for r in table]
    for item in extra:
        name, path = item.split("=", 1)
        rows.append({"row": name, "artifact": path, "mode": "off"})
    seen, out = set(), []
    for r in rows:
        if (r["artifact"], r["mode"]) not in seen:
            seen.add((r["artifact"], r["mode"]))
            out.append(r)
    return out


def reference(rows: list[dict]) -> dict:
    """Memory off of a weaver's artifact: the plain reasoner with the table's prompt."""
    for r in rows:
        kind = read_manifest(r["artifact"]).get("kind", "weaver")
        if r["mode"] == "off" and kind not in ("baseline", "retrieval"):
            return r
    raise MemgenError(
        "the kept block compares every row with memory off: it needs the vanilla row (a weaver "
        "artifact in mode off; quality.py --rows vanilla,...)."
    )


# --------------------------------------------------------------------------- choose
def choose(accuracy: dict[str, float], count: int, threshold: float) -> list[str]:
    """The ``count`` tasks of highest memory-off accuracy at or above ``threshold``, in their
    order in ``accuracy`` (the candidates' order).

    >>> choose({"a": 0.05, "b": 0.4, "c": 0.1, "d": 0.2}, 2, 0.10)
    ['b', 'd']
    >>> choose({"a": 0.05}, 2, 0.10)
    []
    """
    passed = [t for t, acc in accuracy.items() if acc >= threshold]
    best = sorted(passed, key=lambda t: -accuracy[t])[:count]  # stable: ties in candidate order
    return [t for t in accuracy if t in best]


def measure_candidates(args, vanilla: dict, out: Path, quiet: Console) -> dict[str, dict]:
    """Memory off on ``--kept-select-n`` problems of each candidate (seed ``SELECT_SEED``)."""
    candidates = split(args.kept_candidates)
    opts = evaluate.EvalOptions(
        data=candidates,
        artifact=[Path(vanilla["artifact"])],
        memory="off",
        limit=args.kept_select_n,
        batch_size=args.batch_size,
        gen=GenerationConfig(args.max_new_tokens, memory="off"),
        seed=SELECT_SEED,
        output=out / "kept-choice",
        json=False,
        overwrite=True,  # this script's own folder: a rerun replaces the earlier eval
    )
    metrics = evaluate.run(opts, console=quiet)
    by = {r["task"]: r for r in metrics["results"]}
    return {
        t: {"accuracy": round(by[t]["accuracy"], 4), "n": by[t]["n"], "stderr": by[t]["stderr"]}
        for t in candidates
    }


# --------------------------------------------------------------------------- measure
def evaluate_task(task: str, rows: list[dict], vanilla: dict, args, out: Path, quiet) -> dict:
    """Every row on the same ``--kept-n`` problems of ``task`` (one eval run, the vanilla
    artifact first); per row its figures and the paired difference against memory off."""
    import quality  # beside this file: the table's figures

    artifacts = list(dict.fromkeys([vanilla["artifact"], *(r["artifact"] for r in rows)]))
    modes = list(dict.fromkeys(["off", *(r["mode"] for r in rows)]))
    opts = evaluate.EvalOptions(
        data=[task],
        artifact=[Path(a) for a in artifacts],
        memory=",".join(modes),
        limit=args.kept_n,
        batch_size=args.batch_size,
        gen=GenerationConfig(args.max_new_tokens, memory="off"),
        output=out / f"kept-{task.replace(':', '-')}",
        json=False,
        overwrite=True,
    )
    metrics = evaluate.run(opts, console=quiet)
    lines = (Path(metrics["output"]) / "predictions.jsonl").read_text().splitlines()
    correct = correctness(json.loads(line) for line in lines if line.strip())
    off = (vanilla["artifact"], "off")
    cells = {}
    for r in rows:
        key = (r["artifact"], r["mode"])
        got = next(
            x for x in metrics["results"] if (x["artifact"], x["mode"]) == key
        )  # every row asked for runs: plan_entries refuses what it cannot
        vs = None if key == off else paired_on(correct, off, key)
        cells[r["row"]] = {**quality.figures(got), "vs_off": vs}
    return {"cells": cells, "seconds": metrics["seconds"], "seed": seeds_of(metrics)}


def correctness(predictions) -> dict[tuple, dict[int, bool]]:
    """{(artifact, mode): {problem index: solved}} from one eval run's predictions."""
    out: dict[tuple, dict[int, bool]] = {}
    for p in predictions:
        out.setdefault((p["artifact"], p["mode"]), {})[p["index"]] = bool(p["correct"])
    return out


def paired_on(correct: dict, reference: tuple, other: tuple) -> dict:
    """``other`` − ``reference`` on the same problems: difference ± s.e., McNemar p."""
    a, b = correct[reference], correct[other]
    if sorted(a) != sorted(b):
        raise RuntimeError(f"{reference} and {other} ran different problems")
    ids = sorted(a)
    return paired([a[i] for i in ids], [b[i] for i in ids])


def seeds_of(metrics: dict) -> list:
    tasks = metrics.get("config", {}).get("tasks", {})
    return sorted({t.get("seed") for t in tasks.values()}, key=str)


# --------------------------------------------------------------------------- the block
def run(args, table: list[dict], out: Path, quiet: Console) -> dict:
    """The kept block for the table's rows (``table``: entries with row, artifact, mode)."""
    rows = block_rows(table, args.kept_artifact)
    vanilla = reference(rows)
    choice: dict = {"by": "given", "tasks": split(args.kept_tasks)}
    if not choice["tasks"]:
        measured = measure_candidates(args, vanilla, out, quiet)
        chosen = choose({t: m["accuracy"] for t, m in measured.items()}, args.kept_count, args.kept_threshold)  # fmt: skip
        choice = {
            "by": f"memory off ≥ {args.kept_threshold:.0%} on {args.kept_select_n} problems "
            f"(data seed {SELECT_SEED}), the {args.kept_count} best",
            "tasks": chosen,
            "candidates": measured,
        }
        if not chosen:
            scores = ", ".join(f"{t} {m['accuracy']:.0%}" for t, m in measured.items())
            raise MemgenError(
                f"no candidate task reaches {args.kept_threshold:.0%} with memory off ({scores}); "
                "give others with --kept-candidates, or lower --kept-threshold."
            )
    evals = {task: evaluate_task(task, rows, vanilla, args, out, quiet) for task in choice["tasks"]}
    return {
        "rows": [{**r, **{task: e["cells"][r["row"]] for task, e in evals.items()}} for r in rows],
        "tasks": {t: {"n": args.kept_n, "seed": e["seed"]} for t, e in evals.items()},
        "reference": vanilla["row"],
        "choice": choice,
        "eval_seconds": {t: e["seconds"] for t, e in evals.items()},
    }


def markdown_table(block: dict) -> str:
    """The kept block as Markdown: per row and task accuracy ± s.e., the paired difference
    against memory off with its McNemar p, and insertions per answer."""
    tasks = list(block["tasks"])

    def cell(c: dict) -> str:
        text = f"{c['accuracy']:.1f} ± {c['stderr']:.1f} %"
        v = c.get("vs_off")
        if v:
            text += (
                f" ({100 * v['diff']:+.1f} ± {100 * v['diff_stderr']:.1f}, p {v['mcnemar_p']:.2g})"
            )
        if c.get("insertions_per_answer"):
            text += f", {c['insertions_per_answer']:.2f} ins."
        return text

    head = [
        "row",
        "mode",
        *(f"{t.removeprefix('gym:')} (n {block['tasks'][t]['n']})" for t in tasks),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in block["rows"]:
        lines.append("| " + " | ".join([r["row"], r["mode"], *(cell(r[t]) for t in tasks)]) + " |")
    choice = block["choice"]
    notes = [
        f"- every row on the same problems of each task (greedy, the tasks' held-out default "
        f"seed); in brackets the paired difference against {block['reference']} (memory off) in "
        "points ± s.e. and the exact McNemar p; ins.: insertions per answer",
        f"- tasks: {', '.join(tasks)}, chosen {choice['by']}",
    ]
    if choice.get("candidates"):
        measured = ", ".join(
            f"{t.removeprefix('gym:')} {100 * m['accuracy']:.0f} %"
            for t, m in choice["candidates"].items()
        )
        notes.append(f"- memory off on the candidates: {measured}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# --------------------------------------------------------------------------- alone
def default_rows(out: Path) -> list[dict]:
    """The table's rows whose artifact is under ``out`` (as ``quality.py --table`` names them)."""
    import quality

    rows = []
    for row, (name, mode) in quality.TABLE_ROWS.items():
        if (out / name / "memgen.json").is_file():
            rows.append({"row": row, "artifact": str(out / name), "mode": mode})
    return rows


def parse_rows(items: list[str]) -> list[dict]:
    """``NAME=DIR:MODE`` -> a row.

    >>> parse_rows(["vanilla=runs/q/weaver:off"])
    [{'row': 'vanilla', 'artifact': 'runs/q/weaver', 'mode': 'off'}]
    """
    rows = []
    for item in items:
        name, _, rest = item.partition("=")
        path, _, mode = rest.rpartition(":")
        if not (name and path and mode):
            raise SystemExit(f"--row takes NAME=DIR:MODE, got {item!r}")
        rows.append({"row": name, "artifact": path, "mode": mode})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", default=[], metavar="NAME=DIR:MODE")
    p.add_argument("--output", default="runs/quality", help="folder of the table's artifacts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--markdown", action="append", default=[], metavar="PATH")
    add_arguments(p)
    args = p.parse_args(argv)
    check_arguments(p, args)
    import quality

    out = Path(args.output)
    rows = parse_rows(args.row) or default_rows(out)
    try:
        block = run(args, rows, out, Console(file=sys.stderr))
    except MemgenError as exc:
        raise SystemExit(f"error: {exc}") from None
    command = quality.command_line(
        "benchmarks/quality_kept.py", sys.argv[1:] if argv is None else argv
    )
    block |= {"measured": quality.provenance(), "command": command}
    for path in args.markdown:
        quality.write_markdown(Path(path), block, markdown_table, MARKERS)
    print(json.dumps({"kept": block}))


if __name__ == "__main__":
    main()
