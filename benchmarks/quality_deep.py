"""``quality.py --table --deep``: does memory deeper in the reasoner (``memory.inject: kv``) help?

The arms of docs DEEP-MEMORY's fair comparison, one recipe, the same samples, steps, batches and
schedule: prompt tuning and prefix tuning (``memgen baseline sft --method prompt|prefix``; while
``baseline sft`` has no ``--method`` these rows are reported as not available, never faked), the
weaver with input memory (the recipe as it stands), the weaver with kv memory (the same recipe
with ``memory.inject=kv`` and its LoRA on q_proj, k_proj, v_proj at the rank whose trainable
count is closest to the LoRA baseline's, computed from the model's config; refused beyond
±5 %), and LoRA-SFT (``memgen baseline sft``, rank matched to the input weaver).

1. sweep: every row at each of its learning rates (``--lr``; default the recipe's ÷3, ×1, ×3),
   at the first of ``--seeds``; each row keeps the rate with the lowest held-out loss (the
   recipe's ``data.heldout`` samples, disjoint from the problems scored below);
2. seeds: the main rows (input, kv, LoRA) again at their rate, at every further seed;
3. eval: the artifacts at each row's chosen rate (every artifact of 1 and 2 with
   ``--sweep-eval``) in one ``memgen eval`` run per task, on the same problems:
   the table's task (``--n``, 400) and chain_sum, never trained on (``--cross-n``, 200);
4. report: per row its rate, accuracy per seed and their mean, the paired difference against
   memory off (vanilla), training CPU seconds (user + system of the training process, model
   loading included: ``getrusage`` of the child) and answers per second (eval's); per pair of
   rows and per seed the paired difference ± s.e. and the exact McNemar p, from the eval run's
   ``predictions.jsonl`` (``memgen_cli/evaluation/stats.py``); the sweep with each rate's
   held-out loss and accuracies.

Each training is the ``memgen`` command line of its row (``METHODS``): adding a row is one entry
there. Artifacts go to ``--output`` as ``<row>-lr<rate>-s<seed>``; ``deep-runs.json`` there keeps
each one's command and CPU seconds, so ``--reuse`` reports them again without retraining.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality.py --table --deep --output runs/deep --reuse
    .venv/bin/python benchmarks/quality.py --table --deep --n 20 --cross-n 10 --lr 1e-3 \\
        --seeds 42 --set training.max_steps=5 --output runs/deep-smoke        # a smoke run
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from memgen_cli.artifacts import read_manifest
from memgen_cli.config import (
    BaselineLoraConfig,
    GenerationConfig,
    MemoryConfig,
    ModelConfig,
    SFTConfig,
    load_recipe,
)
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import resolve_source
from memgen_cli.stages import evaluate
from memgen_cli.stages.baseline import lora_params_per_rank, matched_rank, weaver_trainable_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the table's shared parts: figures, provenance, Markdown block)
from quality_kept import correctness, paired_on  # noqa: E402  (one eval run's paired figures)


@dataclass(frozen=True)
class Method:
    """One row of the deep table: the ``memgen`` command that trains it, how eval scores it."""

    label: str
    command: tuple[str, ...]
    """``memgen`` arguments before the shared ones (--recipe, --set ..., --output, --overwrite)."""
    mode: str
    """The memory mode eval scores it in (a baseline: off, the adapted reasoner)."""
    main: bool
    """Trained at every ``--seeds`` (the others at the first seed only)."""
    needs: str | None = None
    """An option ``command`` must have; until it has it, the row is reported as not available."""
    kv: bool = False
    """``memory.inject: kv`` with its LoRA on KV_TARGETS at the LoRA baseline's count."""
    prefix: bool = False
    """``memory.kv_prefix`` too (the LoRA rank lowered to keep the count); without ``kv``, on
    the input weaver (its LoRA on the recipe's targets)."""
    reads: str = "context"
    """``memory.weaver_reads``: ``cache`` has the weaver read the reasoner's cached keys and
    values (no input projection: the LoRA rank is raised to keep the count)."""


# Prompt tuning at the weaver's budget is 2,774 virtual tokens on SmolLM2-135M: every training
# sequence grows ~20-fold and one 125-step training did not reach step 5 in 150 s on the 2-core
# machine (LoRA's whole training takes ~3 min). The row uses Lester et al.'s 100 tokens instead,
# under budget, and the table prints its trainable count.
PROMPT_TOKENS = 100
METHODS = {
    "prompt": Method(
        f"prompt tuning ({PROMPT_TOKENS} tokens)",
        ("baseline", "sft", "--method", "prompt", "--set", f"prompt_learning.num_virtual_tokens={PROMPT_TOKENS}"),
        "off", False, "--method",
    ),
    "prefix": Method("prefix tuning", ("baseline", "sft", "--method", "prefix"), "off", False, "--method"),
    "weaver-input": Method("weaver-SFT (input)", ("sft-weaver",), "weaver", True),
    "weaver-kv": Method("weaver-SFT (kv)", ("sft-weaver",), "weaver", True, kv=True),
    "weaver-kvp": Method("weaver-SFT (kv + prefix)", ("sft-weaver",), "weaver", True, kv=True, prefix=True),
    "weaver-inputp": Method("weaver-SFT (input + prefix)", ("sft-weaver",), "weaver", True, prefix=True),
    "weaver-inputpc": Method(
        "weaver-SFT (input + prefix, reads the cache)", ("sft-weaver",), "weaver", True, prefix=True, reads="cache"
    ),
    "weaver-kvc": Method("weaver-SFT (kv, reads the cache)", ("sft-weaver",), "weaver", True, kv=True, reads="cache"),
    "lora": Method("LoRA-SFT", ("baseline", "sft"), "off", True),
}  # fmt: skip
# Pairs are reported as "a − b" with a the row met first here: the question first (kv against
# each other row), then input against the rest, and so on.
ORIENT = (
    "weaver-inputpc",
    "weaver-kvc",
    "weaver-inputp",
    "weaver-kvp",
    "weaver-kv",
    "weaver-input",
    "lora",
    "prefix",
    "prompt",
)
KV_TARGETS = ("q_proj", "k_proj", "v_proj")
RECORDS = "deep-runs.json"


# --------------------------------------------------------------------------- rows
def missing_option(command: tuple[str, ...], option: str) -> str | None:
    """Why ``memgen <command>`` cannot run yet (it has no ``option``), or None when it can."""
    from memgen_cli.cli import app

    cmd, words = typer.main.get_command(app), []
    for word in command:
        if word.startswith("-"):
            break
        cmd = cmd.commands[word]
        words.append(word)
    if any(option in p.opts for p in cmd.params):
        return None
    return f"`memgen {' '.join(words)}` has no {option} option yet"


def plan_rows(asked: list[str], methods: dict[str, Method] = METHODS) -> tuple[list, dict]:
    """(the rows that can be trained, {row: why not} for those that cannot yet), in the order
    of ``methods``; an unknown row is an error."""
    unknown = [r for r in asked if r not in methods]
    if unknown:
        raise MemgenError(f"--rows: unknown {unknown}; the deep table has {list(methods)}.")
    ready, waiting = [], {}
    for row in (r for r in methods if r in asked):
        method = methods[row]
        why = method.needs and missing_option(method.command, method.needs)
        if why:
            waiting[row] = why
        else:
            ready.append(row)
    return ready, waiting


# --------------------------------------------------------------------------- budget
def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The reasoner built from its config on the meta device: its shapes, no weights read."""
    config = AutoConfig.from_pretrained(resolve_source(cfg.base), revision=cfg.revision)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def kv_budget(
    model,
    memory: MemoryConfig,
    lora: BaselineLoraConfig,
    targets=KV_TARGETS,
    prefix=False,
    inject="kv",
    reads="context",
) -> dict:
    """The kv weaver's LoRA rank on ``targets`` whose trainable count is closest to the LoRA
    baseline's (its rank matched to the input weaver of ``memory``, as ``baseline sft`` does),
    with both counts; more than 5 % apart is refused. Alpha keeps the recipe's alpha / r.
    ``prefix``: with ``memory.kv_prefix``, whose tensors count towards the weaver's own.
    ``inject="input"``: the same for the input weaver (``targets`` then the recipe's).
    ``reads``: ``memory.weaver_reads`` (``cache``: no input projection)."""
    weaver = weaver_trainable_params(model, memory)
    lora_rank = lora.r or matched_rank(model, lora.targets, weaver)
    lora_count = lora_rank * lora_params_per_rank(model, lora.targets)
    targets = list(targets) if inject == "kv" else list(memory.lora_targets)
    kv = dataclasses.replace(
        memory, inject=inject, kv_prefix=prefix, lora_targets=targets, lora_r=0, weaver_reads=reads
    )
    own = weaver_trainable_params(model, kv)  # queries, norms, scales: kv has no projections
    unit = lora_params_per_rank(model, list(targets))
    rank = max(1, round((lora_count - own) / unit))
    count = own + rank * unit
    gap = count / lora_count - 1
    if abs(gap) > 0.05:
        raise MemgenError(
            f"no LoRA rank on {', '.join(targets)} brings the kv weaver ({own:,} own parameters "
            f"+ {unit:,} per rank) within ±5 % of LoRA-SFT's {lora_count:,}: r {rank} gives "
            f"{count:,} ({100 * gap:+.1f} %). Change memory.lora_r or the latent counts."
        )
    return {
        "kv_rank": rank,
        "kv_alpha": max(1, round(rank * memory.lora_alpha / memory.lora_r)),
        "kv_targets": list(targets),
        "kv_trainable_params": count,
        "kv_prefix": prefix,
        "inject": inject,
        "weaver_reads": reads,
        "lora_rank": lora_rank,
        "lora_trainable_params": lora_count,
        "input_trainable_params": weaver,
        "gap": round(gap, 4),
    }


def kv_sets(budget: dict) -> list[str]:
    """The ``--set`` items that turn the recipe's weaver into the kv one at that budget."""
    kv = budget.get("inject", "kv") == "kv"
    return [
        *(["memory.inject=kv"] if kv else []),
        *([f"memory.lora_targets=[{','.join(budget['kv_targets'])}]"] if kv else []),
        f"memory.lora_r={budget['kv_rank']}",
        f"memory.lora_alpha={budget['kv_alpha']}",
        # Always said: the recipe may have its own (the table's has the prefix on).
        f"memory.kv_prefix={'true' if budget.get('kv_prefix') else 'false'}",
        *(["memory.weaver_reads=cache"] if budget.get("weaver_reads") == "cache" else []),
    ]


def row_sets(method: Method, budgets: dict) -> list[str]:
    """The ``--set`` items of a row: a weaver row's memory settings at its budget
    (``budgets[kv, prefix, reads]``), every one said (the recipe may carry others, e.g. the
    table's prefix); none for the baselines, which take the recipe's and match their rank."""
    if method.command != ("sft-weaver",):
        return []
    return kv_sets(budgets[method.kv, method.prefix, method.reads])


# --------------------------------------------------------------------------- sweep and seeds
@dataclass(frozen=True)
class Run:
    """One training: a row at a learning rate and a seed."""

    row: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.row}-lr{self.lr:g}-s{self.seed}"


def parse_lrs(items: list[str], rows: list[str], recipe_lr: float) -> dict[str, list[float]]:
    """``--lr`` items (``A,B,C`` for every row, ``ROW=A,B,C`` for one; later items win) into
    each row's rates; default the recipe's rate ÷3, ×1 and ×3 (two significant digits).

    >>> parse_lrs(["lora=1e-4,3e-4"], ["weaver-kv", "lora"], 1e-3)
    {'weaver-kv': [0.00033, 0.001, 0.003], 'lora': [0.0001, 0.0003]}
    """
    default = [float(f"{recipe_lr * f:.2g}") for f in (1 / 3, 1, 3)]
    lrs = dict.fromkeys(rows, default)
    for item in items:
        row, _, values = item.rpartition("=")
        if row and row not in rows:
            raise MemgenError(f"--lr {item}: {row!r} is not one of the rows run ({rows}).")
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise MemgenError(f"--lr {item}: rates are numbers, e.g. 3e-4,1e-3,3e-3.") from None
        if not rates or min(rates) <= 0:
            raise MemgenError(f"--lr {item}: give at least one rate, each above 0.")
        for r in [row] if row else rows:
            lrs[r] = list(dict.fromkeys(rates))
    return lrs


def parse_seeds(text: str | None, recipe_seed: int) -> list[int]:
    """``--seeds 42,43``; default the recipe's seed and the next one."""
    if text is None:
        return [recipe_seed, recipe_seed + 1]
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise MemgenError(f"--seeds {text}: whole numbers, e.g. 42,43.") from None
    if not seeds:
        raise MemgenError("--seeds needs at least one seed.")
    return seeds


def sweep_plan(rows: list[str], lrs: dict[str, list[float]], seeds: list[int]) -> list[Run]:
    """Step 1: every row at each of its rates, at the first seed; each row's middle rate first
    (the recipe's, by default), so a stopped sweep already compares every row at one rate."""

    def middle_first(rates: list[float]) -> list[float]:
        mid = len(rates) // 2 if len(rates) % 2 else 0
        return [rates[mid], *rates[:mid], *rates[mid + 1 :]]

    ordered = {row: middle_first(lrs[row]) for row in rows}
    depth = max(len(r) for r in ordered.values())
    return [
        Run(row, ordered[row][i], seeds[0])
        for i in range(depth)
        for row in rows
        if i < len(ordered[row])
    ]


def seed_plan(rows, chosen: dict[str, float], seeds: list[int], methods=METHODS) -> list[Run]:
    """Step 2: the main rows again at their chosen rate, at every further seed."""
    return [Run(row, chosen[row], s) for row in rows if methods[row].main for s in seeds[1:]]


def final_loss(manifest: dict) -> float | None:
    """A trained artifact's held-out loss at the end (``training.heldout_loss``'s ``*_final``)."""
    losses = (manifest.get("training") or {}).get("heldout_loss") or {}
    return next((v for k, v in losses.items() if k.endswith("_final")), None)


def choose_lr(runs: list[Run], losses: dict[str, float | None]) -> dict[str, float]:
    """Each row's rate with the lowest held-out loss (``losses`` by run name); a row swept at
    one rate keeps it. The lower rate wins a tie."""
    chosen = {}
    for row in dict.fromkeys(r.row for r in runs):
        mine = [r for r in runs if r.row == row]
        if len(mine) == 1:
            chosen[row] = mine[0].lr
            continue
        scored = [(losses.get(r.name), r.lr) for r in mine]
        if any(loss is None for loss, _ in scored):
            raise MemgenError(
                f"{row}: no held-out loss to choose its learning rate by; give the recipe "
                "data.heldout > 0 (--set data.heldout=32), or sweep one rate (--lr ROW=RATE)."
            )
        chosen[row] = min(scored)[1]
    return chosen


# --------------------------------------------------------------------------- training
def train_command(run: Run, method: Method, recipe, sets: list[str], path: Path) -> list[str]:
    """The ``memgen`` command line that trains ``run`` into ``path``."""
    sets = [*sets, f"training.learning_rate={run.lr!r}", f"training.seed={run.seed}"]
    return [
        *(sys.executable, "-m", "memgen_cli", *method.command, "--recipe", str(recipe)),
        *(word for item in sets for word in ("--set", item)),
        *("--output", str(path), "--overwrite"),  # this script's own folder
    ]


def train(runs: list[Run], args, sets: dict[str, list[str]], out: Path, records: dict, quiet):
    """Train each run not already on disk (``--reuse``) as a child process, its output on our
    stderr; record its command, wall and CPU seconds in ``records`` and ``deep-runs.json``."""
    for run in runs:
        target = out / run.name
        if args.reuse and (target / "memgen.json").is_file():
            records.setdefault(run.name, {"cpu_s": None, "wall_s": None, "command": None})
            continue
        cmd = train_command(run, METHODS[run.row], args.recipe, sets[run.row], target)
        shown = "memgen " + shlex.join(cmd[3:])
        quiet.print(f"[bold]{run.name}[/]: {escape(shown)}", highlight=False)  # [q_proj,...]
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        code = subprocess.run(cmd, stdout=2).returncode  # stdout stays this script's JSON
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if code != 0:
            raise MemgenError(f"{run.name}: `{shown}` failed (exit {code}); see above.")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        wall = time.perf_counter() - start
        records[run.name] = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "command": shown}
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RECORDS + ".tmp")
        tmp.write_text(json.dumps(records, indent=2) + "\n")
        os.replace(tmp, out / RECORDS)


def stored_params(path: Path) -> int:
    """The trainable numbers an artifact stores: its adapter and the weaver's own tensors (the
    trigger, trained by another stage, left out)."""
    total = 0
    for file in [*path.rglob("adapter_model.safetensors"), *path.glob("weaver.safetensors")]:
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total


# --------------------------------------------------------------------------- eval and pairs
def evaluate_runs(paths: dict[str, Path], modes: list[str], spec, args, out, quiet) -> tuple:
    """Every artifact on the same problems of one task, in one eval run: (its metrics, the
    correctness of each (artifact, mode) by problem index, from its predictions.jsonl)."""
    task, options, n = spec
    opts = evaluate.EvalOptions(
        data=[task],
        artifact=list(paths.values()),
        memory=",".join(modes),
        limit=n,
        batch_size=args.batch_size,
        gen=GenerationConfig(args.max_new_tokens, memory="off"),
        task_options=options,
        output=out / ("deep-" + (Path(task).stem if "/" in task else task.replace(":", "-"))),
        json=False,  # the table goes to stderr; stdout is this script's JSON
        overwrite=True,
    )
    metrics = evaluate.run(opts, console=quiet)
    lines = (Path(metrics["output"]) / "predictions.jsonl").read_text().splitlines()
    return metrics, correctness([json.loads(line) for line in lines if line.strip()])


def pairs(rows: list[str], runs: dict[str, list[Run]], paths, evals: dict) -> list[dict]:
    """Every two rows, a − b (``ORIENT``), per task and per seed both were trained at: the
    paired difference ± s.e. and the exact McNemar p; and the difference's mean over seeds."""
    out = []
    order = sorted(rows, key=lambda r: ORIENT.index(r) if r in ORIENT else len(ORIENT))
    for a, b in combinations(order, 2):
        seeds = [r.seed for r in runs[a] if r.seed in {s.seed for s in runs[b]}]
        entry = {"pair": f"{a} − {b}", "a": a, "b": b, "seeds": seeds}
        for task, (_, correct) in evals.items():
            each = []
            for seed in seeds:
                ka = (str(paths[_at(runs[a], seed).name]), METHODS[a].mode)
                kb = (str(paths[_at(runs[b], seed).name]), METHODS[b].mode)
                each.append({"seed": seed, **paired_on(correct, kb, ka)})
            mean = sum(e["diff"] for e in each) / len(each) if each else None
            entry[task] = {"per_seed": each, "mean_diff": mean}
        out.append(entry)
    return out


def _at(runs: list[Run], seed: int) -> Run:
    return next(r for r in runs if r.seed == seed)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


# --------------------------------------------------------------------------- the run
def run(args) -> dict:
    """Steps 1-4 of the module docstring; one JSON-ready dict."""
    cfg = load_recipe(SFTConfig, args.recipe, args.overrides)
    out, quiet = Path(args.output), Console(file=sys.stderr)
    asked = [r.strip() for r in (args.rows or ",".join(METHODS)).split(",") if r.strip()]
    rows, waiting = plan_rows(asked)
    for row, why in waiting.items():
        quiet.print(f"[yellow]{METHODS[row].label}: not available yet[/] ({why}): no row.")
    if not rows:
        raise MemgenError(f"none of the rows asked for can be trained yet: {waiting}")
    lrs = parse_lrs(args.lr, rows, cfg.training.learning_rate)
    seeds = parse_seeds(args.seeds, cfg.training.seed)
    meta = meta_model(cfg.model)
    budgets = {}  # every weaver's budget, by (kv, prefix, reads), each computed once

    def budget_of(kv: bool, prefix: bool, reads: str = "context") -> dict:
        if (kv, prefix, reads) not in budgets:
            budgets[kv, prefix, reads] = kv_budget(
                meta, cfg.memory, BaselineLoraConfig(), prefix=prefix,
                inject="kv" if kv else "input", reads=reads,
            )  # fmt: skip
        return budgets[kv, prefix, reads]

    budget = budget_of(True, False)
    kv_prefix, input_prefix = budget_of(True, True), budget_of(False, True)
    quiet.print(
        f"trainable parameters: LoRA-SFT {budget['lora_trainable_params']:,} (r "
        f"{budget['lora_rank']}), weaver-SFT (kv) {budget['kv_trainable_params']:,} (r "
        f"{budget['kv_rank']} on {', '.join(KV_TARGETS)}, {100 * budget['gap']:+.1f} %), "
        f"weaver-SFT (input) {budget['input_trainable_params']:,}, weaver-SFT (kv + prefix) "
        f"{kv_prefix['kv_trainable_params']:,} (r {kv_prefix['kv_rank']}, "
        f"{100 * kv_prefix['gap']:+.1f} %), weaver-SFT (input + prefix) "
        f"{input_prefix['kv_trainable_params']:,} (r {input_prefix['kv_rank']}, "
        f"{100 * input_prefix['gap']:+.1f} %)"
    )
    for m in (METHODS[row] for row in rows if METHODS[row].command == ("sft-weaver",)):
        seen = (m.kv, m.prefix, m.reads) in budgets
        b = budget_of(m.kv, m.prefix, m.reads)
        if m.reads != "context" and not seen:
            quiet.print(
                f"{m.label}: {b['kv_trainable_params']:,} trainable (r {b['kv_rank']}, "
                f"{100 * b['gap']:+.1f} %)"
            )
    sets = {row: args.overrides + row_sets(METHODS[row], budgets) for row in rows}

    path = out / RECORDS
    records = json.loads(path.read_text()) if args.reuse and path.is_file() else {}
    sweep = sweep_plan(rows, lrs, seeds)  # 1. sweep
    train(sweep, args, sets, out, records, quiet)
    losses = {r.name: final_loss(read_manifest(out / r.name)) for r in sweep}
    chosen = choose_lr(sweep, losses)
    extra = seed_plan(rows, chosen, seeds)  # 2. seeds
    train(extra, args, sets, out, records, quiet)
    every = sweep + extra
    paths = {r.name: out / r.name for r in every}
    scored = every if args.sweep_eval else [r for r in every if r.lr == chosen[r.row]]

    modes = list(dict.fromkeys(["off", *(METHODS[r].mode for r in rows)]))  # 3. eval
    specs = quality.task_specs(args, cfg)
    scored_paths = {r.name: paths[r.name] for r in scored}
    evals = {spec[0]: evaluate_runs(scored_paths, modes, spec, args, out, quiet) for spec in specs}

    final = {row: [r for r in every if r.row == row and r.lr == chosen[row]] for row in rows}
    weavers = [r for r in scored if METHODS[r.row].mode != "off"]  # 4. report
    vanilla = (str(paths[weavers[0].name]), "off") if weavers else None
    table = [
        row_entry(row, every, chosen[row], paths, records, evals, vanilla)
        if row in final
        else {"row": row, "label": METHODS[row].label, "available": False, "why": waiting[row]}
        for row in METHODS
        if row in final or row in waiting
    ]
    return {
        "deep": True,
        "table": table,
        "vanilla": vanilla
        and {task: quality.figures(_result(m, *vanilla)) for task, (m, _) in evals.items()},
        "pairs": pairs(rows, final, paths, evals),
        "sweep": [
            sweep_entry(r, r.lr == chosen[r.row], losses, records, paths, evals) for r in sweep
        ],
        "budget": budget,
        "budget_prefix": kv_prefix,
        "budget_input_prefix": input_prefix,
        "lrs": lrs,
        "selection": f"lowest held-out loss ({cfg.data.heldout} samples) at seed {seeds[0]}",
        "seeds": {"train": seeds, "sweep": seeds[0]},
        "tasks": {
            task: {"n": n, "options": options, "seed": quality.seeds_of(evals[task][0])}
            for task, options, n in specs
        },
        "measured": quality.provenance(),
        "command": quality.command_line(),
        "recipe": str(args.recipe),
        "overrides": {"sft": args.overrides},
        "eval_seconds": {task: m["seconds"] for task, (m, _) in evals.items()},
        "eval_outputs": {task: m["output"] for task, (m, _) in evals.items()},  # predictions
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "records": str(out / RECORDS),
    }


def row_entry(row: str, every: list[Run], lr: float, paths, records, evals, vanilla) -> dict:
    """One row at its chosen rate: per seed and task the figures and the paired difference
    against vanilla, and their means; trainable parameters; training CPU seconds (one training,
    mean over seeds; and the row's whole sweep)."""
    mode = METHODS[row].mode
    runs = [r for r in every if r.row == row and r.lr == lr]
    cpu = [records[r.name]["cpu_s"] for r in runs]
    entry = {
        "row": row,
        "label": METHODS[row].label,
        "mode": mode,
        "lr": lr,
        "seeds": [r.seed for r in runs],
        "artifacts": [str(paths[r.name]) for r in runs],
        "trainable_params": stored_params(paths[runs[0].name]),
        "train_cpu_s": _mean(cpu),
        "train_cpu_s_each": cpu,
        "sweep_cpu_s": _sum([records[r.name]["cpu_s"] for r in every if r.row == row]),
    }
    for task, (metrics, correct) in evals.items():
        cells = []
        for r in runs:
            key = (str(paths[r.name]), mode)
            vs = vanilla and paired_on(correct, vanilla, key)
            cells.append(
                {"seed": r.seed, **quality.figures(_result(metrics, *key)), "vs_vanilla": vs}
            )
        entry[task] = {
            "accuracy": _mean([c["accuracy"] for c in cells]),
            "answers_per_s": _mean([c["samples_per_s"] for c in cells]),
            "per_seed": cells,
        }
    return entry


def sweep_entry(run: Run, chosen: bool, losses, records, paths, evals) -> dict:
    """One training of the sweep: its rate, held-out loss, CPU seconds, accuracy per task."""
    key = (str(paths[run.name]), METHODS[run.row].mode)
    return {
        "row": run.row,
        "lr": run.lr,
        "seed": run.seed,
        "chosen": chosen,
        "heldout_loss": losses.get(run.name),
        "cpu_s": records[run.name]["cpu_s"],
        **{
            task: quality.figures(_result(m, *key))["accuracy"]
            if any(r["artifact"] == key[0] for r in m["results"])
            else None  # not scored: --sweep-eval scores every rate
            for task, (m, _) in evals.items()
        },
    }


def _result(metrics: dict, artifact: str, mode: str) -> dict:
    return next(r for r in metrics["results"] if r["artifact"] == artifact and r["mode"] == mode)


def _sum(values: list) -> float | None:
    return None if any(v is None for v in values) else round(sum(values), 1)


# --------------------------------------------------------------------------- Markdown
MARKERS = ("<!-- quality-deep:begin -->", "<!-- quality-deep:end -->")  # its own block


def markdown_table(result: dict) -> str:
    """The deep result as Markdown: the rows, the pairs, the sweep and the settings."""
    tasks = list(result["tasks"])
    first = tasks[0]

    def name(task: str) -> str:
        return f"{task.removeprefix('gym:')} (n {result['tasks'][task]['n']})"

    def acc(cell: dict) -> str:
        seeds = cell["per_seed"]
        if len(seeds) == 1:
            return f"{seeds[0]['accuracy']:.1f} ± {seeds[0]['stderr']:.1f} %"
        each = ", ".join(format(c["accuracy"], ".1f") for c in seeds)
        return f"{cell['accuracy']:.1f} % ({each})"

    def diff(v: dict | None) -> str:
        if not v:
            return "–"
        return f"{100 * v['diff']:+.1f} ± {100 * v['diff_stderr']:.1f} (p {v['mcnemar_p']:.2g})"

    def number(x, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    head = ["row", "lr", "seeds", *map(name, tasks), f"vs vanilla, {name(first)}"]
    head += ["trainable params", "training CPU s (sweep)", "answers/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vanilla = result.get("vanilla")
    if vanilla:
        cells = [f"{vanilla[t]['accuracy']:.1f} ± {vanilla[t]['stderr']:.1f} %" for t in tasks]
        rate = number(vanilla[first]["samples_per_s"], ".2f")
        lines.append(
            "| "
            + " | ".join(["vanilla (memory off)", "–", "–", *cells, "–", "0", "–", rate])
            + " |"
        )
    for r in result["table"]:
        if not r.get("available", True):
            rest = ["–"] * (len(head) - 2)
            lines.append(
                f"| {r['label']} | not available yet: {r['why']} | " + " | ".join(rest) + " |"
            )
            continue
        cpu = f"{number(r['train_cpu_s'], ',.0f')} ({number(r.get('sweep_cpu_s'), ',.0f')})"
        cells = [
            r["label"],
            f"{r['lr']:g}",
            ", ".join(map(str, r["seeds"])),
            *(acc(r[t]) for t in tasks),
            "; ".join(diff(c["vs_vanilla"]) for c in r[first]["per_seed"]),
            number(r["trainable_params"], ",d"),
            cpu,
            number(r[first]["answers_per_s"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "| pair (a − b), per seed | " + " | ".join(map(name, tasks)) + " |"]
    lines.append("|" + "---|" * (1 + len(tasks)))
    for p in result["pairs"]:
        cells = ["; ".join(f"s{e['seed']} {diff(e)}" for e in p[t]["per_seed"]) for t in tasks]
        lines.append(f"| {p['pair']} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "| sweep: row | lr | held-out loss | " + " | ".join(map(name, tasks)) + " | CPU s |",
    ]
    lines.append("|" + "---|" * (4 + len(tasks)))
    for s in result["sweep"]:
        lr = f"**{s['lr']:g}**" if s["chosen"] else f"{s['lr']:g}"
        cells = [s["row"], lr, number(s["heldout_loss"], ".4f")]
        cells += [number(s[t], ".1f") + " %" * (s[t] is not None) for t in tasks]
        cells += [number(s["cpu_s"], ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")

    b, m = result["budget"], result["measured"]
    problems = "; ".join(
        f"{t} n {s['n']}, data seed {', '.join(map(str, s.get('seed') or ['default']))}"
        for t, s in result["tasks"].items()
    )
    settings = [
        f"- measured {m['date']} at commit `{m['commit']}` on {m['machine']}, torch {m['torch']}",
        f"- command: `{result['command']}`",
        f"- recipe `{quality.rel(result['recipe'])}`; overrides: "
        f"{json.dumps(result['overrides']['sft']) if result['overrides']['sft'] else 'none'}",
        f"- trainable parameters: LoRA-SFT {b['lora_trainable_params']:,} (r {b['lora_rank']}); "
        f"weaver-SFT (kv) {b['kv_trainable_params']:,} (LoRA r {b['kv_rank']}, alpha "
        f"{b['kv_alpha']} on {', '.join(b['kv_targets'])}; {100 * b['gap']:+.1f} %); "
        f"weaver-SFT (input) {b['input_trainable_params']:,}"
        + (
            f"; weaver-SFT (kv + prefix) {bp['kv_trainable_params']:,} (LoRA r {bp['kv_rank']}, "
            f"alpha {bp['kv_alpha']}, and the prefix; {100 * bp['gap']:+.1f} %)"
            if (bp := result.get("budget_prefix"))
            else ""
        )
        + (
            f"; weaver-SFT (input + prefix) {bi['kv_trainable_params']:,} (LoRA r "
            f"{bi['kv_rank']}, alpha {bi['kv_alpha']} on {', '.join(bi['kv_targets'])}, and the "
            f"prefix; {100 * bi['gap']:+.1f} %)"
            if (bi := result.get("budget_input_prefix"))
            else ""
        ),
        f"- learning rate per row: {result['selection']} (bold in the sweep); seeds "
        f"{', '.join(map(str, result['seeds']['train']))} for the main rows (the weavers and LoRA)",
        f"- problems (greedy, the same for every row): {problems}",
        "- vs vanilla and pairs: paired difference in points ± s.e., exact McNemar p; training "
        "CPU s: user + system of one training process (model loading included), in brackets "
        "the row's whole sweep",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(settings) + "\n"
