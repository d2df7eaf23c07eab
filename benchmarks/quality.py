"""Does the memory help? One recipe end to end, against memory off and a LoRA reference.

Trains the weaver with a ``sft-weaver`` recipe, trains the plain LoRA-SFT reference of the
reasoner (``memgen baseline sft``) on the same samples, steps, batches and learning-rate
schedule, then evaluates memory ``off``, the ``weaver`` and the LoRA reference on exactly the
same held-out problems of the training task and of one task never trained on (cross-domain,
paper Fig. 9). Prints one JSON object: task and settings, training seconds, held-out loss
(memory off / untrained weaver / trained weaver / LoRA), accuracy ± standard error per row,
the paired difference of each row against memory off, mean insertions per answer.

    .venv/bin/python benchmarks/quality.py                          # n = 400 (+ 200 cross-domain)
    .venv/bin/python benchmarks/quality.py --n 100 --no-lora --set training.max_steps=60
    .venv/bin/python benchmarks/quality.py --reuse runs/quality     # re-evaluate trained models

``--table``: the paper's comparison (Table 3) on one recipe family: vanilla, LoRA-SFT,
weaver-SFT, LoRA-GRPO, weaver-GRPO and weaver-GRPO + trained trigger, each trained by its stage
from the recipes beside the SFT one (``baseline-sft``, ``grpo-weaver`` from the SFT weaver,
``baseline-grpo`` from the LoRA-SFT adapter, ``train-trigger`` on the GRPO weaver), all scored in
one ``memgen eval`` run on the same problems (rows that repeat a computation are reused, see
``same_run_key``). One JSON table: per row, accuracy ± s.e. on both tasks, the paired figure
against vanilla, training seconds (the stage's own, and the sum along its chain), trainable
parameters and insertions per answer.

    .venv/bin/python benchmarks/quality.py --table --reuse           # trains what is missing
    .venv/bin/python benchmarks/quality.py --table --reuse --markdown README.md --markdown docs/results.md

``--table --deep``: the deep-memory comparison instead (``benchmarks/quality_deep.py``): prompt
tuning, prefix tuning, weaver-SFT with input memory, weaver-SFT with kv memory (``memory.inject:
kv`` at LoRA-SFT's trainable count) and LoRA-SFT, each with a learning-rate sweep (``--lr``), the
main three at several seeds (``--seeds``), every pair of rows compared on the same problems.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality.py --table --deep --output runs/deep \
        --reuse --markdown docs/results.md

``--markdown PATH`` (repeatable, with ``--table``) also writes the table as Markdown, with its
settings (recipes, n, seeds, commit, date, machine, torch), into the block between
``<!-- quality-table:begin -->`` and ``<!-- quality-table:end -->`` of PATH: the block is
replaced where it exists and appended otherwise; the rest of the file is left as it is.

Run it alone on the machine: training and evaluation times are part of what it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from memgen_cli.artifacts import read_manifest
from memgen_cli.config import BaselineConfig, GenerationConfig, SFTConfig, load_recipe
from memgen_cli.errors import MemgenError
from memgen_cli.stages import (
    baseline,
    baseline_grpo,
    evaluate,
    grpo_weaver,
    sft_weaver,
    train_trigger,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_kept  # noqa: E402  (the --kept block, beside this file)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml"
# Never trained on: chain_sum states a problem differently ("State the final answer to the
# following arithmetic problem: 4 + 3 =") and mixes in 1-2 digit terms the same way.
CROSS = "gym:chain_sum"
CROSS_OPTIONS = [
    "config={min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2, allow_negation: false}"
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(RECIPE), help="a sft-weaver recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=value")
    p.add_argument("--n", type=int, default=400, help="held-out problems of the training task")
    p.add_argument("--cross-n", type=int, default=200, help="held-out problems of --cross")
    p.add_argument("--cross", default=CROSS, help="a task never trained on ('' to skip)")
    p.add_argument("--cross-option", action="append", default=None, help="its --task-option")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA-SFT reference")
    p.add_argument("--output", default="runs/quality", help="folder for models and evals")
    p.add_argument("--reuse", action="store_true", help="keep models already in --output")
    p.add_argument("--table", action="store_true", help="the six rows of the paper's table")
    p.add_argument(
        "--deep",
        action="store_true",
        help="with --table: the deep-memory rows instead (prompt tuning, prefix tuning, "
        "weaver-SFT input and kv, LoRA-SFT; benchmarks/quality_deep.py)",
    )
    p.add_argument(
        "--rows",
        default=None,
        help="table rows to train and score (comma list; default: all of the table's)",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="[ROW=]A,B,C",
        help="with --deep: learning rates swept, for every row or for ROW (repeatable; "
        "default: the recipe's rate ÷3, ×1, ×3)",
    )
    p.add_argument(
        "--sweep-eval",
        action="store_true",
        help="with --deep: score every rate of the sweep too (default: each row's chosen rate, "
        "picked by held-out loss, and its seeds)",
    )
    p.add_argument(
        "--seeds",
        metavar="S,T",
        help="with --deep: training seeds of input, kv and LoRA; the sweep runs at the first "
        "(default: the recipe's seed and the next)",
    )
    p.add_argument(
        "--use",
        action="append",
        default=[],
        help="NAME=DIR: take table artifact NAME (weaver, lora, weaver-grpo, lora-grpo, trigger) "
        "from DIR instead of training it",
    )
    p.add_argument(
        "--trigger-parent", default="weaver-grpo", help="the weaver the trigger is trained on"
    )
    p.add_argument(
        "--retrieval",
        metavar="DIR",
        default=None,
        help="with --table: a retrieval row (memgen baseline retrieval's artifact, memory off; "
        "k and similarity chosen by benchmarks/retrieval_sweep.py), scored on the same problems",
    )
    for row in ("grpo", "lora-grpo", "trigger"):
        p.add_argument(
            f"--{row}-set", action="append", default=[], help=f"a.b=value for the {row} recipe"
        )
    p.add_argument(
        "--markdown",
        action="append",
        default=[],
        metavar="PATH",
        help="with --table: write the table and its settings as Markdown into the marked "
        "block of PATH (replaced if present, appended otherwise; repeatable); with --kept the "
        "kept block too, appended only where PATH has no table block yet",
    )
    p.add_argument(
        "--kept", action="store_true", help="with --table: the kept block (quality_kept.py)"
    )
    quality_kept.add_arguments(p)
    args = p.parse_args(argv)
    quality_kept.check_arguments(p, args)
    if args.markdown and not args.table:
        p.error("--markdown writes the --table table; add --table")
    if args.deep and not args.table:
        p.error("--deep gives the --table its deep-memory rows; add --table")
    if (args.lr or args.seeds) and not args.deep:
        p.error("--lr and --seeds set the --deep table's sweep; add --table --deep")
    if args.deep and args.use:
        p.error("--use takes artifacts of the paper's table; --deep trains its own")
    return args


def train(cfg: SFTConfig, out: Path, lora: bool, reuse: bool, quiet: Console) -> dict[str, Path]:
    """The weaver and (optionally) its LoRA reference, trained on the same samples and steps."""
    paths = {"weaver": out / "weaver"}
    if not (reuse and (paths["weaver"] / "memgen.json").is_file()):
        weaver = dataclasses.replace(cfg, output=str(paths["weaver"]))
        sft_weaver.run(weaver, console=quiet, overwrite=True)  # retrain: replace an earlier one
    if lora:
        paths["lora"] = out / "lora"
        if not (reuse and (paths["lora"] / "memgen.json").is_file()):
            ref = BaselineConfig(
                model=cfg.model,
                memory=cfg.memory,
                data=cfg.data,
                training=cfg.training,
                output=str(paths["lora"]),
            )
            baseline.run(ref, console=quiet, overwrite=True)
    return paths


def figures(r: dict) -> dict:
    """One eval row's figures, in percent and rounded."""
    return {
        "accuracy": round(100 * r["accuracy"], 2),
        "stderr": round(100 * r["stderr"], 2),
        "n": r["n"],
        "insertions_per_answer": round(r["mean_insertions"], 2),
        "tokens_per_answer": round(r["mean_tokens"], 1),
        "samples_per_s": r["samples_per_s"] and round(r["samples_per_s"], 2),
    }


def evaluate_task(
    paths: dict[str, Path], task: str, options: list[str], n: int, args, out: Path, quiet: Console
) -> dict:
    """Every model on the same problems of ``task``: off, weaver, LoRA (when trained)."""
    opts = evaluate.EvalOptions(
        data=[task],
        artifact=list(paths.values()),
        memory="off,weaver",
        limit=n,
        batch_size=args.batch_size,
        gen=GenerationConfig(args.max_new_tokens, memory="off"),
        task_options=options,
        output=out / f"eval-{task.replace(':', '-')}",
        json=True,
        overwrite=True,  # this script's own folder: a rerun replaces the earlier eval
    )
    metrics = evaluate.run(opts, console=quiet)
    rows = {}
    for r in metrics["results"]:
        name = "lora" if r["artifact"] == str(paths.get("lora")) else r["mode"]
        rows[name] = {**figures(r), "vs_off": r.get("vs_first")}
    return {"task": task, "task_options": options, "seconds": metrics["seconds"], "rows": rows}


# --------------------------------------------------------------------------- the table
# row -> (artifact, memory mode); the artifacts' folders under --output
TABLE_ROWS = {
    "vanilla": ("weaver", "off"),
    "lora-sft": ("lora", "off"),
    "weaver-sft": ("weaver", "weaver"),
    "lora-grpo": ("lora-grpo", "off"),
    "weaver-grpo": ("weaver-grpo", "weaver"),
    "weaver-grpo+trigger": ("trigger", "full"),
}
PARENT = {"weaver-grpo": "weaver", "lora-grpo": "lora", "trigger": "weaver-grpo"}


def table_artifacts(args) -> tuple[list[str], dict[str, Path]]:
    """The rows asked for, and the artifacts they need (given by --use, or trained in order)."""
    rows = [r.strip() for r in (args.rows or ",".join(TABLE_ROWS)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in TABLE_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(TABLE_ROWS)}")
    PARENT["trigger"] = args.trigger_parent
    needed: list[str] = []

    def need(name: str) -> None:
        if name in PARENT:
            need(PARENT[name])
        if name not in needed:
            needed.append(name)

    for row in rows:
        need(TABLE_ROWS[row][0])
    given = dict(item.split("=", 1) for item in args.use)
    return rows, {name: Path(given[name]) for name in needed if name in given} | {
        name: Path(args.output) / name for name in needed if name not in given
    }


def train_table(args, cfg: SFTConfig, out: Path, quiet: Console) -> tuple[list, dict]:
    """The SFT artifacts as ``train`` makes them, then the GRPO ones from them and the trigger
    (each only where a row needs it and it is neither --use'd nor, with --reuse, on disk)."""
    rows, paths = table_artifacts(args)
    ready = {
        n
        for n, p in paths.items()
        if p.parent != out or (args.reuse and (p / "memgen.json").is_file())
    }
    if not {"weaver", "lora"} <= ready:
        train(cfg, out, "lora" in paths and "lora" not in ready, args.reuse, quiet)
    family = Path(args.recipe).parent
    stages = {
        "weaver-grpo": (grpo_weaver, "grpo-weaver.yaml", args.grpo_set, "init"),
        "lora-grpo": (baseline_grpo, "baseline-grpo.yaml", args.lora_grpo_set, "init"),
        "trigger": (train_trigger, "train-trigger.yaml", args.trigger_set, "artifact"),
    }
    for name, (stage, recipe, overrides, parent_key) in stages.items():
        if name not in paths or name in ready:
            continue
        parent = {parent_key: paths[PARENT[name]]}
        conf = stage.resolve_config(family / recipe, overrides, output=paths[name], **parent)
        stage.run(conf, console=quiet, overwrite=True)
    return rows, paths


def trainable_params(path: Path, manifest: dict, lora_manifest: dict) -> int:
    """What the row's last stage trained: a LoRA, the weaver, or the trigger head."""
    if manifest.get("kind") == "baseline":
        return manifest["budget"]["trainable_params"]
    if manifest["training"].get("stage") == "train-trigger":
        shapes = manifest["tensors"]["trigger"]
        return sum(math.prod(s) for name, s in shapes.items() if name != "trained")
    if lora_manifest is not None:
        return lora_manifest["budget"]["weaver_trainable_params"]
    return None  # counted by the LoRA baseline's stage; not trained here


def table(args, cfg: SFTConfig, out: Path, quiet: Console) -> dict:
    rows_asked, paths = train_table(args, cfg, out, quiet)
    manifests = {name: read_manifest(path) for name, path in paths.items()}
    specs = task_specs(args, cfg)
    names = list(paths)
    extra = [Path(args.retrieval)] if args.retrieval else []
    evals = []
    for task, options, n in specs:
        opts = evaluate.EvalOptions(
            data=[task],
            artifact=[paths[name] for name in names] + extra,
            memory=",".join(dict.fromkeys(TABLE_ROWS[r][1] for r in ["vanilla", *rows_asked])),
            limit=n,
            batch_size=args.batch_size,
            gen=GenerationConfig(args.max_new_tokens, memory="off"),
            task_options=options,
            output=out / f"table-{task.replace(':', '-')}",
            json=False,  # the table goes to stderr; stdout is this script's JSON
            overwrite=True,
        )
        evals.append((task, evaluate.run(opts, console=quiet)))

    def chain(name: str) -> float:  # training seconds along the row's lineage
        own_s = manifests[name]["training"].get("wall_s") or 0.0
        return own_s + (chain(PARENT[name]) if name in PARENT else 0.0)

    parents = {n: PARENT[n] for n in paths if n in PARENT}

    rows = []
    for row in rows_asked:
        name, mode = TABLE_ROWS[row]
        label = row
        if name == "trigger":  # named after the weaver it was trained on
            label = {"weaver": "weaver-sft", "weaver-grpo": "weaver-grpo"}[PARENT["trigger"]]
            label += "+trigger"
        entry = {"row": label, "artifact": str(paths[name]), "mode": mode}
        if row != "vanilla":
            entry["train_s"] = manifests[name]["training"].get("wall_s")
            entry["train_s_total"] = round(chain(name), 1)
            entry["trainable_params"] = trainable_params(
                paths[name], manifests[name], manifests.get("lora")
            )
        for task, metrics in evals:
            got = next(
                r
                for r in metrics["results"]
                if r["artifact"] == str(paths[name]) and r["mode"] == mode
            )
            entry[task] = {**figures(got), "vs_vanilla": got.get("vs_first")}
        rows.append(entry)
    if args.retrieval:
        rows.append(retrieval_row(Path(args.retrieval), evals))
    return {
        "table": rows,
        "tasks": {
            task: {"n": n, "options": options, "seed": seeds_of(metrics)}
            for (task, options, n), (_, metrics) in zip(specs, evals, strict=True)
        },
        "seeds": {"train": cfg.training.seed},
        "lora_rank": (manifests.get("lora") or {}).get("lora", {}).get("r"),
        "measured": provenance(),
        "command": command_line(),
        "recipe": str(args.recipe),
        "family": str(Path(args.recipe).parent),
        "artifacts": {name: str(path) for name, path in paths.items()},
        "parents": parents,
        "overrides": {
            "sft": args.overrides,
            "grpo": args.grpo_set,
            "lora-grpo": args.lora_grpo_set,
            "trigger": args.trigger_set,
        },
        "eval_seconds": {task: metrics["seconds"] for task, metrics in evals},
        "heldout_loss": manifests["weaver"]["training"].get("heldout_loss"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def retrieval_row(path: Path, evals: list) -> dict:
    """The retrieval artifact's row: nothing trained; its build time is its training time."""
    manifest = read_manifest(path)
    if manifest.get("kind") != "retrieval":
        raise SystemExit(
            f"--retrieval {path}: not a retrieval artifact (memgen baseline retrieval)"
        )
    r, built = manifest["retrieval"], manifest["training"]
    build_s = round((built.get("store_s") or 0.0) + (built.get("index_s") or 0.0), 1)
    entry = {
        "row": f"retrieval ({r['similarity']}, k {r['k']})",
        "artifact": str(path),
        "mode": "off",
        "train_s": build_s,
        "train_s_total": build_s,
        "trainable_params": 0,
        "store_s": built.get("store_s"),
        "index_s": built.get("index_s"),
    }
    for task, metrics in evals:
        got = next(x for x in metrics["results"] if x["artifact"] == str(path))
        entry[task] = {**figures(got), "vs_vanilla": got.get("vs_first")}
    return entry


def task_specs(args, cfg: SFTConfig) -> list[tuple[str, list[str], int]]:
    """(task, task options, n) of the table's tasks: the recipe's own, then ``--cross``."""
    own = [f"{k}={json.dumps(v)}" for k, v in cfg.data.options.items()]
    cross_opts = CROSS_OPTIONS if args.cross_option is None else args.cross_option
    return [(cfg.data.task, own, args.n)] + [(args.cross, cross_opts, args.cross_n)] * bool(
        args.cross
    )


def seeds_of(metrics: dict) -> list:
    """The data seeds an eval run drew its problems with (gym tasks: held out from training)."""
    tasks = metrics.get("config", {}).get("tasks", {})
    return sorted({t.get("seed") for t in tasks.values()}, key=str)


# --------------------------------------------------------------------------- --markdown
BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
LABELS = {
    "vanilla": "vanilla (memory off)",
    "lora-sft": "LoRA-SFT (TRL)",
    "weaver-sft": "weaver-SFT",
    "lora-grpo": "LoRA-GRPO (TRL)",
    "weaver-grpo": "weaver-GRPO",
    "weaver-grpo+trigger": "weaver-GRPO + trained trigger",
    "weaver-sft+trigger": "weaver-SFT + trained trigger",
}


def provenance() -> dict:
    """Where and when the table was measured: commit, date, machine and torch version."""
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {
        "commit": commit,
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }


def command_line(script: str = "benchmarks/quality.py", argv: list[str] | None = None) -> str:
    """This run's command (``script`` with ``argv``, default this process's arguments), with
    the thread count that its timings depend on."""
    threads = os.environ.get("OMP_NUM_THREADS")
    cmd = f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)
    return f"OMP_NUM_THREADS={threads} {cmd}" if threads else cmd


def rel(path: str) -> str:
    """A path relative to the repository when it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def markdown_table(result: dict) -> str:
    """The ``--table`` result as a Markdown table plus the settings it was measured with.

    Columns: accuracy ± s.e. and the paired difference against vanilla on the training task,
    insertions per answer there, accuracy on every other task, training seconds along the
    row's lineage, trainable parameters.
    """
    tasks = list(result["tasks"])
    first, others = tasks[0], tasks[1:]

    def acc(cell: dict) -> str:
        return f"{cell['accuracy']:.1f} ± {cell['stderr']:.1f} %"

    def vs(cell: dict) -> str:
        v = cell.get("vs_vanilla")
        return "–" if not v else f"{100 * v['diff']:+.1f} ± {100 * v['diff_stderr']:.1f}"

    def count(x, fmt: str = ",.0f") -> str:
        return "–" if x is None else format(x, fmt)

    def insertions(x: float) -> str:
        return "0" if not x else f"{x:.2f}"

    def name(task: str) -> str:
        return f"{task.removeprefix('gym:')} (n {result['tasks'][task]['n']})"

    head = [
        "row",
        name(first),
        "vs vanilla",
        "insertions per answer",
        "answers/s",
        *map(name, others),
        "training s (chain)",
        "trainable params",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["table"]:
        label = LABELS.get(r["row"], r["row"])
        if r["row"] == "lora-sft" and result.get("lora_rank"):
            label = f"LoRA-SFT (r {result['lora_rank']}, TRL)"
        cells = [
            label,
            acc(r[first]),
            vs(r[first]),
            insertions(r[first]["insertions_per_answer"]),
            count(r[first].get("samples_per_s"), ".2f"),
            *(acc(r[t]) for t in others),
            count(r.get("train_s_total")),
            count(r.get("trainable_params")),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    m = result["measured"]
    overrides = {k: v for k, v in result.get("overrides", {}).items() if v}
    problems = "; ".join(
        f"{t} n {s['n']}"
        + (f", options {' '.join(f'`{o}`' for o in s['options'])}" if s.get("options") else "")
        + f", data seed {', '.join(map(str, s.get('seed') or ['default']))}"
        for t, s in result["tasks"].items()
    )
    evals = " + ".join(f"{s:.0f} s" for s in result.get("eval_seconds", {}).values())
    settings = [
        f"- measured {m['date']} at commit `{m['commit']}` on {m['machine']}, torch {m['torch']}",
        f"- command: `{result['command']}`",
        f"- recipes: `{rel(result['recipe'])}` (weaver-SFT and LoRA-SFT), and beside it "
        "`grpo-weaver.yaml`, `baseline-grpo.yaml`, `train-trigger.yaml`; overrides: "
        f"{json.dumps(overrides) if overrides else 'none'}",
        f"- problems (greedy, the same for every row): {problems}",
        f"- training seed {result.get('seeds', {}).get('train')}; "
        f"OMP_NUM_THREADS {result.get('omp_num_threads') or 'unset'}; eval {evals}",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(settings) + "\n"


def write_markdown(
    path: Path, result: dict, render=None, markers=(BEGIN, END), append: bool = True
) -> bool:
    """Put the table (``render(result)``, default ``markdown_table``) between ``markers`` in
    ``path``: replace that block if present, else append it (creating the file), unless
    ``append`` is false; whether it was written. Nothing outside the block changes; the write
    is atomic."""
    begin, close = markers
    block = (
        f"{begin}\n<!-- written by benchmarks/quality.py --table --markdown; "
        f"edits inside this block are overwritten -->\n\n{(render or markdown_table)(result)}"
        f"\n{close}"
    )
    text = ""
    if path.exists():
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the file's own
            text = f.read()
    start = text.find(begin)
    if start >= 0:
        end = text.find(close, start)
        if end < 0:
            raise SystemExit(f"{path}: {begin} without {close} after it; fix the file by hand")
        text = text[:start] + block + text[end + len(close) :]
    elif not append:
        return False
    else:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        text = text + sep + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def write_blocks(paths: list[str], result: dict, kept: bool, say=print) -> None:
    """``--markdown``: the table's block into each file, and with ``--kept`` the kept block.
    A file whose author placed the table's block but no kept block's markers (the README,
    which links to the kept block in docs/results.md) does not get it appended at its end:
    ``say`` tells where to put the markers."""
    for name in paths:
        path = Path(name)
        placed = path.exists() and BEGIN in path.read_text(encoding="utf-8")
        write_markdown(path, result)
        if not kept:
            continue
        block = (result["kept"], quality_kept.markdown_table, quality_kept.MARKERS)
        if not write_markdown(path, *block, append=not placed):
            say(
                f"{path}: has the table's block but no {quality_kept.MARKERS[0]} ... "
                f"{quality_kept.MARKERS[1]}: the kept block is not written there (put those "
                "two lines where it belongs to have it)"
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.deep:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import quality_deep  # beside this file; it imports this module's shared parts

        try:
            result = quality_deep.run(args)
        except MemgenError as exc:
            raise SystemExit(f"error: {exc}") from None
        for path in args.markdown:
            write_markdown(Path(path), result, quality_deep.markdown_table, quality_deep.MARKERS)
        print(json.dumps(result))
        return
    if args.table:
        cfg = load_recipe(SFTConfig, args.recipe, args.overrides)
        result = table(args, cfg, Path(args.output), Console(file=sys.stderr))
        if args.kept:
            result["kept"] = quality_kept.run(args, result["table"], Path(args.output), Console(file=sys.stderr))  # fmt: skip
        write_blocks(args.markdown, result, args.kept, lambda line: print(line, file=sys.stderr))
        print(json.dumps(result))
        return
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    cfg = load_recipe(SFTConfig, args.recipe, args.overrides)
    out = Path(args.output)
    quiet = Console(file=sys.stderr)
    paths = train(cfg, out, not args.no_lora, args.reuse, quiet)
    weaver = read_manifest(paths["weaver"])["training"]
    own = [f"{k}={json.dumps(v)}" for k, v in cfg.data.options.items()]
    tasks = [evaluate_task(paths, cfg.data.task, own, args.n, args, out, quiet)]
    if args.cross:
        cross_opts = CROSS_OPTIONS if args.cross_option is None else args.cross_option
        tasks.append(evaluate_task(paths, args.cross, cross_opts, args.cross_n, args, out, quiet))
    result = {
        "recipe": str(args.recipe),
        "overrides": args.overrides,
        "task": cfg.data.task,
        "task_options": cfg.data.options,
        "memory": dataclasses.asdict(cfg.memory),
        "training": {
            k: getattr(cfg.training, k)
            for k in ("learning_rate", "max_steps", "batch_size", "scheduler", "schedule")
        },
        "samples": weaver["samples"],
        "train_s": {"weaver": weaver["wall_s"]},
        "heldout_loss": {
            "off": weaver["heldout_loss"].get("memory_off"),
            "weaver_untrained": weaver["heldout_loss"].get("weaver_initial"),
            "weaver": weaver["heldout_loss"].get("weaver_final"),
        },
        "eval": tasks,
        "omp_num_threads": torch_threads,
    }
    if "lora" in paths:
        manifest = read_manifest(paths["lora"])
        lora = manifest["training"]
        result["train_s"]["lora"] = lora.get("wall_s")
        result["heldout_loss"]["lora"] = (lora.get("heldout_loss") or {}).get("lora_final")
        result["lora_rank"] = manifest["lora"].get("r")
        result["trainable_params"] = {
            "weaver": manifest["budget"]["weaver_trainable_params"],
            "lora": manifest["budget"]["trainable_params"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
