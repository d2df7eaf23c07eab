"""``memgen eval``: the same reasoner with memory off, with the weaver, and with weaver +
trigger, and any number of artifacts (weavers, LoRA baselines) side by side, on exactly the
same problems, in one run. The memory mode is a field of the GenerationConfig; a LoRA baseline
runs as the adapted reasoner (its adapter merged, memory off).

Reads top to bottom: validate the request (artifacts and their modes, tasks) -> load the
problems once -> per artifact (one model in memory at a time), per task, cut the problems into
batches once; per mode, generate and grade them -> gather on rank 0 -> one row per (task,
artifact, mode), each with a paired figure against its task's first row (difference ± s.e.,
exact McNemar p) -> table, ``metrics.json`` and ``predictions.jsonl``.

Under ``torchrun``/``accelerate launch`` whole *batches* are dealt round-robin to the
ranks. A batch holds the same problems whatever the number of processes, so a multi-process
run computes exactly what a single process computes, only spread out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from memgen_cli import __version__, distributed
from memgen_cli.artifacts import (
    artifact_digest,
    atomic_dir,
    check_output,
    load_baseline,
    read_manifest,
)
from memgen_cli.config import MEMORY_MODES, GenerationConfig, MemoryConfig
from memgen_cli.console import make_console
from memgen_cli.data import Example, Task, get_task, to_messages
from memgen_cli.data.gym import GraderErrors, grade_checked
from memgen_cli.errors import MemgenError, did_you_mean
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages.common import Session, open_session, resolve_suffix
from memgen_cli.versions import environment_versions, version_differences

# When the artifact records a train seed but not how many items it drew, assume this many
# (reasoning_gym item i comes from Random(seed + i), so a seed names a range of generators).
ASSUMED_GYM_RANGE = 100_000


@dataclass
class EvalOptions:
    data: list[str]
    """Tasks: names (gsm8k, gsm_symbolic, gym:<name>, ...) or GSM8K-format .jsonl paths;
    several may be given, or one comma-separated string."""
    artifact: Path | list[Path] | None = None
    """One artifact, or several (also comma-separated): every one runs on the same problems."""
    base: str | None = None
    memory: str | None = None
    """Comma-separated modes; None: off plus every mode the artifact supports."""
    limit: int | None = None
    split: str | None = None
    batch_size: int = 16
    gen: GenerationConfig = field(default_factory=lambda: GenerationConfig(512, memory="off"))
    seed: int | None = None
    """Data seed: the generator seed of gym tasks (default: held out from training) and a
    shuffle seed for fixed datasets (default: file order). Also seeds sampling."""
    output: Path | None = None
    json: bool = False
    prompt_suffix: str | None = None
    task_options: list[str] = field(default_factory=list)
    """``key=value`` (YAML value, dotted keys nest) passed to every task, e.g. grader=numeric."""
    device: str = "auto"
    dtype: str = "auto"
    allow_base_mismatch: bool = False
    overwrite: bool = False
    """Replace an earlier eval output at ``output``; anything else there is refused."""
    show: int = 0
    """After the table, the first ``show`` problems of each task: question, gold answer, and
    per row the answer extracted with ✓ / ✗ (table output only)."""


@dataclass
class Problem:
    index: int  # position in the task's problem list
    example: Example
    messages: list[dict]


def run(opts: EvalOptions, console: Console | None = None) -> dict:
    """Evaluate; return the metrics object (on rank 0; an empty dict on the other ranks)."""
    dist = distributed.init()
    console = console or make_console()
    notes = make_console(stderr=True, quiet=not dist.is_main)
    try:
        return _evaluate(opts, dist, console, notes)
    finally:
        distributed.finish()


def _evaluate(opts: EvalOptions, dist, console: Console, notes: Console) -> dict:
    # 1. validate everything that is cheap, before any model is loaded
    if opts.limit is not None and opts.limit < 1:
        raise MemgenError(f"--limit must be at least 1 (got {opts.limit}); omit it for all.")
    if opts.batch_size < 1:
        raise MemgenError(f"--batch-size must be at least 1 (got {opts.batch_size}).")
    out = opts.output or Path("runs") / "eval" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    check_output(out, kind="eval", overwrite=opts.overwrite)
    entries = plan_entries(artifact_paths(opts.artifact), opts.memory, notes)
    manifests = [e.manifest for e in entries if e.manifest is not None]
    options = parse_task_options(opts.task_options)
    per_task = {
        label: task_options(label, options, manifests, notes) for label in parse_specs(opts.data)
    }
    tasks = {label: get_task(label, **kw) for label, kw in per_task.items()}
    # 2. the problems (the same for every artifact and mode)
    problems: dict[str, list[Example]] = {}
    seeds: dict[str, int | None] = {}
    for label, task in tasks.items():
        seeds[label] = data_seed(task, opts.seed, opts.limit, manifests, notes)
        problems[label] = task.load(opts.split, opts.limit, seeds[label])
        if not problems[label]:
            raise MemgenError(
                f"task {label!r} gave no problems for split {opts.split or task.default_split!r}."
            )
    warnings = [
        text
        for e in entries
        for text in contamination_warnings(e.manifest, e.label, tasks, opts.split)
    ]
    for text in warnings:
        notes.print(f"[yellow]warning:[/] {text}", highlight=False)
    # 3. per artifact (one model at a time), per task, per mode: generate, grade, gather
    device = distributed.device_for_rank(opts.device, dist.local_rank)
    started = time.perf_counter()
    results, predictions, used = [], [], []
    sampling_seed = opts.gen.seed if opts.seed is None else opts.seed
    done: dict[tuple, tuple[str | None, list[dict], dict]] = {}  # runs that can be reused
    for entry in entries:
        session = open_entry(entry, opts, device)
        suffix = resolve_suffix(session, opts.prompt_suffix, notes)
        system = ((entry.manifest or {}).get("prompt") or {}).get("system")
        used.append(entry_config(entry, session, suffix))
        if changed := version_differences((entry.manifest or {}).get("versions")):
            notes.print(f"{_short(entry.label)}: made with other versions ({', '.join(changed)})")
        for label, task in tasks.items():
            items = [
                Problem(i, ex, to_messages(ex, suffix, system))
                for i, ex in enumerate(problems[label])
            ]
            batches = make_batches(session.model.tokenizer, items, opts.batch_size)
            mine = distributed.shard(list(enumerate(batches)), dist.rank, dist.world_size)
            for mode in entry.modes:
                key = same_run_key(entry, session, mode, (label, suffix, system))
                if key in done:
                    first, records, row = done[key]
                    if dist.is_main:
                        notes.print(
                            f"{_short(entry.label)} · memory {mode}: the same model, prompt and "
                            f"problems as {_short(first)}'s; its answers are reused"
                        )
                        results.append({**row, "artifact": entry.label, "reused_from": first})
                        predictions += [{**r, "artifact": entry.label} for r in records]
                    continue
                gen = replace(opts.gen, memory=mode, seed=sampling_seed)
                part = run_mode(session, task, label, mine, gen, notes, show=dist.is_main)
                parts = distributed.gather_to_main(part)
                if key is not None:
                    done[key] = (entry.label, [], {})
                if not dist.is_main:
                    continue
                records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
                for r in records:
                    r["artifact"] = entry.label
                seconds = max(p["seconds"] for p in parts)
                row = summarize(
                    label, task, mode, records, seconds, sum(p["grade_s"] for p in parts)
                )
                errors = [r["grader_error"] for r in records if r["grader_error"]]
                GraderErrors(len(records), errors).check(f"{label} (memory {mode})")
                results.append({"artifact": entry.label, **row})
                predictions += records
                if key is not None:
                    done[key] = (entry.label, records, row)
        del session  # one model in memory at a time
    if not dist.is_main:
        return {}
    # 4. report: rows by task, then artifact, then mode; each against its task's first row
    order = {label: i for i, label in enumerate(tasks)}
    results.sort(key=lambda r: order[r["task"]])  # stable: artifact and mode order kept
    predictions.sort(key=lambda p: order[p["task"]])
    add_paired(results, predictions)
    metrics = {
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": warnings,
        "config": run_config(opts, used, seeds, problems, dist.world_size, per_task),
    }
    write_outputs(out, metrics, predictions)
    metrics["output"] = str(out)
    if opts.json:
        console.print(json.dumps(metrics), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(results_table(results, metrics["seconds"], out, warnings))
        if opts.show:
            console.print(examples_table(predictions, opts.show))
    return metrics


# --------------------------------------------------------------------------- artifacts
@dataclass
class Entry:
    """One model under evaluation: an artifact (or the plain reasoner) and its memory modes."""

    label: str | None  # the artifact path as given; None: the plain reasoner
    path: Path | None
    manifest: dict | None
    modes: list[str]

    @property
    def is_baseline(self) -> bool:
        return bool(self.manifest and self.manifest.get("kind") == "baseline")


def artifact_paths(artifact) -> list[Path]:
    """``--artifact a --artifact b,c`` -> [a, b, c] (order kept, repeats dropped)."""
    items = artifact if isinstance(artifact, (list, tuple)) else [artifact]
    specs = [s.strip() for item in items if item is not None for s in str(item).split(",")]
    return [Path(s) for s in dict.fromkeys(s for s in specs if s)]


def same_run_key(entry: Entry, session: Session, mode: str, where: tuple) -> tuple | None:
    """What makes two rows the same computation, so that a later one reuses the first.

    Memory off of a weaver artifact is its plain reasoner; memory weaver ignores the trigger.
    So artifacts on the same base (a weaver and its GRPO or trigger children, say) share their
    off rows, and a trigger artifact shares its weaver row with its parent. Sampling is seeded
    per batch, so the reuse holds for sampled runs too. Baselines are never shared.
    """
    if entry.is_baseline or mode == "full":
        return None
    key = (*where, session.base.fingerprint, mode)
    if mode == "off":
        return key
    model = session.model
    digest = hashlib.sha256()
    for name, tensor in sorted(model.weaver_parameters().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return (*key, digest.hexdigest(), json.dumps(asdict(model.cfg), sort_keys=True))


def asked_modes(memory: str | None) -> list[str]:
    return [m.strip() for m in (memory or "").split(",") if m.strip()]


def plan_entries(paths: list[Path], memory: str | None, notes: Console) -> list[Entry]:
    """What runs: without artifacts the plain reasoner (memory off); a weaver artifact in the
    modes asked for (default: off + every mode it supports); a LoRA baseline as the adapted
    reasoner, mode off only (it has no memory)."""
    if not paths:
        return [Entry(None, None, None, parse_modes(memory, None, notes))]
    entries = []
    weavers = [p for p in paths if read_manifest(p).get("kind") != "baseline"]
    triggered = [p for p in weavers if read_manifest(p)["trigger"].get("trained")]
    for path in paths:
        manifest = read_manifest(path)
        if manifest.get("kind") == "baseline":
            entries.append(Entry(str(path), path, manifest, ["off"]))
        elif triggered and path not in triggered and "full" in asked_modes(memory):
            # Several artifacts: full runs where there is a trained trigger to run it.
            rest = ",".join(m for m in memory.split(",") if m.strip() != "full")
            notes.print(f"{path}: no trained trigger, so no memory full row for it.")
            if rest.strip(", "):
                entries.append(Entry(str(path), path, manifest, parse_modes(rest, manifest, notes)))
        else:
            entries.append(Entry(str(path), path, manifest, parse_modes(memory, manifest, notes)))
    asked = [m for m in (memory or "").split(",") if m.strip() and m.strip() != "off"]
    if asked and all(e.is_baseline for e in entries):
        raise MemgenError(
            f"--memory {','.join(asked)} needs a weaver artifact; LoRA baselines have no memory "
            "and run as the adapted reasoner (memory off). Drop --memory, or add a weaver."
        )
    if any(e.is_baseline for e in entries) and len(entries) > 1:
        notes.print("LoRA baselines run as the adapted reasoner (memory off).")
    return entries


def open_entry(entry: Entry, opts: EvalOptions, device) -> Session:
    """The model of one entry; a baseline's adapter is merged into its reasoner, so that the
    memory-off path of generation runs the adapted weights."""
    if not entry.is_baseline:
        return open_session(opts.base, entry.path, device, opts.dtype, opts.allow_base_mismatch)
    loaded = load_base(opts.base, device, opts.dtype) if opts.base else None
    peft, manifest, base = load_baseline(
        entry.path,
        loaded,
        device=device,
        dtype=opts.dtype,
        allow_base_mismatch=opts.allow_base_mismatch,
    )
    merged = peft.merge_and_unload()
    adapted = LoadedBase(merged, base.tokenizer, base.name, base.source, base.fingerprint)
    return Session(MemGenModel(merged, base.tokenizer, MemoryConfig()).eval(), adapted, manifest)


def entry_config(entry: Entry, session: Session, suffix: str) -> dict:
    return {
        "path": entry.label,
        "sha256": None if entry.path is None else artifact_digest(entry.path),
        "kind": (entry.manifest or {}).get("kind", "plain"),
        "modes": entry.modes,
        "prompt_suffix": suffix,
        "base": {"name": session.base.name, "fingerprint": session.base.fingerprint},
        "device": str(session.model.device),
        "dtype": str(session.base.model.dtype).removeprefix("torch."),
        "versions": (entry.manifest or {}).get("versions"),  # the environment that made it
    }


# --------------------------------------------------------------------------- paired figures
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


# --------------------------------------------------------------------------- validation
def parse_specs(data: list[str]) -> list[str]:
    """``--data a --data b,c`` -> [a, b, c], duplicates dropped, order kept."""
    specs = [s.strip() for item in data for s in item.split(",") if s.strip()]
    if not specs:
        raise MemgenError(
            "--data needs at least one task (e.g. --data gsm8k or --data path/to/test.jsonl)."
        )
    return list(dict.fromkeys(specs))


def parse_modes(memory: str | None, manifest: dict | None, notes: Console) -> list[str]:
    """The memory modes to compare. Default: off, plus weaver (and full when the artifact has
    a trained trigger). Asking for weaver/full without an artifact is an error, not a silent
    memory-off run that would be mistaken for the comparison that was asked for."""
    has_trigger = bool(manifest and manifest["trigger"].get("trained"))
    if memory is None:
        if manifest is None:
            notes.print(
                "[yellow]No --artifact: only memory off (the plain reasoner) is evaluated.[/]"
            )
            return ["off"]
        return ["off", "weaver"] + (["full"] if has_trigger else [])
    modes = list(dict.fromkeys(m.strip() for m in memory.split(",") if m.strip()))
    for mode in modes:
        if mode not in MEMORY_MODES:
            raise MemgenError(
                f'unknown memory mode "{mode}"; use a comma-separated list of {", ".join(MEMORY_MODES)}.'
                + did_you_mean(mode, MEMORY_MODES)
            )
    if not modes:
        raise MemgenError(f"--memory needs at least one of {', '.join(MEMORY_MODES)}.")
    wanted = [m for m in modes if m != "off"]
    if wanted and manifest is None:
        raise MemgenError(
            f"--memory {','.join(wanted)} needs a trained weaver: pass --artifact DIR. "
            "Without an artifact only off (the plain reasoner) is available."
        )
    if "full" in modes and not has_trigger:
        raise MemgenError(
            "--memory full needs a trained trigger, and this artifact has none. Compare "
            "--memory off,weaver, or train one with `memgen train-trigger`."
        )
    return modes


def task_options(label: str, given: dict, manifests: list[dict], notes: Console) -> dict:
    """Options for one task: those given with --task-option, else, for the task an artifact
    trained on, the options it recorded (its difficulty, say), so that it is evaluated on the
    same kind of problem it learned from, on held-out seeds."""
    if given:
        return given
    for manifest in manifests:
        training = manifest.get("training") or {}
        recorded = training.get("task_options")
        if recorded and training.get("task") in (label, f"gym:{label}"):
            notes.print(f"{_short(label)}: task options from the artifact: {recorded}")
            return dict(recorded)
    return {}


def parse_task_options(items: list[str]) -> dict:
    """``["grader=numeric", "columns.prompt=problem"]`` -> {"grader": "numeric",
    "columns": {"prompt": "problem"}}; values are read as YAML (numbers, lists, mappings)."""
    options: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MemgenError(f'--task-option expects key=value, got "{item}".')
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MemgenError(f'--task-option "{item}" conflicts with an earlier option.')
        node[leaf] = value
    return options


# What `memgen sft-weaver` records in ``manifest["training"]``: every item it drew counts.
_DRAWN = ("samples", "dropped_too_long", "heldout_samples", "heldout_dropped_too_long")


def _recorded_train_data(manifest: dict | None, task: Task) -> tuple[int, int | None] | None:
    """(generator seed, items drawn) of the artifact's training data, if it was this task.

    Reads the training summary of the manifest: ``task``, ``data_seed`` and the sample counts.
    """
    training = (manifest or {}).get("training") or {}
    if training.get("task") != task.name or training.get("data_seed") is None:
        return None
    drawn = sum(int(training.get(key) or 0) for key in _DRAWN)
    return int(training["data_seed"]), drawn or None


def data_seed(
    task: Task, seed: int | None, limit: int | None, manifest, notes: Console
) -> int | None:
    """The seed for ``task.load``: the user's, else (generated tasks) a held-out eval seed.

    ``manifest`` is one artifact's manifest, a list of them, or None. reasoning_gym item i is
    drawn from Random(seed + i), so train and eval overlap when their seed ranges do. The
    task's default eval seed is moved past every artifact's recorded train range that it
    would meet; a user-given seed that meets one gets a warning.
    """
    if task.train_seed is None:  # fixed data: the seed shuffles (or orders options)
        return task.eval_seed if seed is None else seed
    manifests = manifest if isinstance(manifest, list) else [manifest]
    recorded = [r for m in manifests if (r := _recorded_train_data(m, task)) is not None]
    if recorded:
        task.train_seed = recorded[0][0]  # the duplicate-question filter reads a real train set
    start = task.eval_seed if seed is None else seed
    ranges = [(lo, lo + (drawn or ASSUMED_GYM_RANGE)) for lo, drawn in recorded]

    def meets(s: int) -> tuple[int, int] | None:
        return next(
            (r for r in ranges if s < r[1] and r[0] < s + (limit or ASSUMED_GYM_RANGE)), None
        )

    hit = meets(start)
    if hit is not None and seed is not None:
        notes.print(
            f"[yellow]warning:[/] --seed {seed} draws {task.name} problems from the same "
            f"generator range as the artifact's training data (seed {hit[0]}); results may be inflated."
        )
        return start
    moved = start
    while hit is not None:
        lo, moved = hit
        hit = meets(moved)
    if moved != start:
        notes.print(
            f"{task.name}: eval seed moved to {moved}, past the artifact's train range [{lo}, {moved})."
        )
    return moved


# --------------------------------------------------------------------------- contamination
# reasoning_gym's gsm_symbolic templates were written from GSM8K *test* problems (e.g. "Emily
# can peel 6 shrimp", "Sunny is selling gingerbread"): a model trained on it has seen GSM8K
# test in disguise, so its GSM8K test score is not a held-out score.
GSM8K_TEST_SOURCES = ("gsm_symbolic", "gym:gsm_symbolic")


def trained_tasks(manifest: dict | None) -> list[str]:
    """The tasks an artifact and its ancestors (when still on disk) were trained on."""
    tasks, seen = [], 0
    while manifest and seen < 16:  # a parent chain longer than this is not a real lineage
        task = (manifest.get("training") or {}).get("task")
        if task:
            tasks.append(task)
        parent = (manifest.get("parent") or {}).get("name")
        try:
            manifest = json.loads((Path(parent) / "memgen.json").read_text()) if parent else None
        except (OSError, ValueError):
            manifest = None
        seen += 1
    return tasks


def is_gsm8k_test(task: Task, split: str | None) -> bool:
    """Whether ``task`` reads GSM8K's test set: the hub's (or a directory's) test split, or
    a GSM8K-format file whose name says test (a single file is used for any split)."""
    if task.name != "gsm8k":
        return False
    path = getattr(task, "path", None)
    if path is None or Path(path).is_dir():
        return (split or task.default_split) == "test"
    return "test" in Path(path).stem.lower()


def contamination_warnings(
    manifest: dict | None, artifact, tasks: dict[str, Task], split: str | None
) -> list[str]:
    """One warning per (artifact trained on gsm_symbolic, GSM8K test task) pair."""
    sources = [t for t in trained_tasks(manifest) if t in GSM8K_TEST_SOURCES]
    if not sources:
        return []
    return [
        f"{artifact} was trained on {sources[0]}, whose templates were built from GSM8K test "
        f"problems; its score on {_short(label)} (GSM8K test) is contaminated, not held out. "
        "Evaluate on another task, or train on GSM8K train (--data gsm8k) for a GSM8K score."
        for label, task in tasks.items()
        if is_gsm8k_test(task, split)
    ]


# --------------------------------------------------------------------------- generation
def make_batches(tokenizer, items: list[Problem], batch_size: int) -> list[list[Problem]]:
    """Batches of similar prompt length (less padding), longest first (a memory error shows
    at once, and the time estimate errs on the safe side)."""

    def length(item: Problem) -> int:
        text = tokenizer.apply_chat_template(
            item.messages, tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    ordered = sorted(items, key=length, reverse=True)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def run_mode(
    session: Session, task: Task, label: str, batches, gen: GenerationConfig, notes, show: bool
) -> dict:
    """Generate and grade this rank's batches in one memory mode."""
    total = sum(len(batch) for _, batch in batches)
    model, tok = session.model, session.model.tokenizer
    records, seconds, grade_s = [], 0.0, 0.0
    name = TextColumn(f"{_short(label)} · memory {gen.memory}")
    columns = [name, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    live = show and notes.is_terminal  # a batch job's log gets a line per batch instead
    with Progress(*columns, console=notes, transient=True, disable=not live) as progress:
        bar = progress.add_task("eval", total=total)
        for number, batch in batches:
            enc = encode_prompts(tok, [p.messages for p in batch], model.device)
            tick = time.perf_counter()
            # Seeded per batch, so sampling does not depend on how batches are spread.
            out = generate(
                model, enc["input_ids"], enc["attention_mask"], replace(gen, seed=gen.seed + number)
            )
            seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            records += [
                prediction(task, label, gen.memory, p, out, row, tok) for row, p in enumerate(batch)
            ]
            grade_s += time.perf_counter() - tick
            progress.advance(bar, len(batch))
            if show and not live:
                notes.print(f"{_short(label)} · memory {gen.memory}: {len(records)}/{total}")
    return {"records": records, "seconds": seconds, "grade_s": grade_s}


def prediction(task: Task, label: str, mode: str, problem: Problem, out, row: int, tok) -> dict:
    completion = tok.decode(out.tokens[row], skip_special_tokens=True)
    score, grader_error = grade_checked(task, completion, problem.example)
    return {
        "task": label,
        "mode": mode,
        "index": problem.index,
        "id": problem.example.id,
        "prompt": problem.messages[-1]["content"],
        "completion": completion,
        "extracted": task.extract(completion),
        "gold": problem.example.answer,
        "score": score,
        "correct": score >= 1.0,
        "grader_error": grader_error,  # what the task's scorer raised (the score is then 0)
        "num_tokens": len(out.tokens[row]),
        "finished": out.finished[row],
        "insertions": [ins.summary() for ins in out.trace.for_row(row)],
    }


# --------------------------------------------------------------------------- reporting
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


def run_config(
    opts: EvalOptions, used: list[dict], seeds, problems, world_size, per_task: dict
) -> dict:
    """How the run was made. ``artifact``, ``base``, ``modes``, ``prompt_suffix``, ``device``
    and ``dtype`` describe the first artifact (as a single-artifact run always did);
    ``artifacts`` lists every one."""
    first = used[0]
    return {
        "memgen_version": __version__,
        "versions": environment_versions(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base": first["base"],
        "artifact": None
        if first["path"] is None
        else {"path": first["path"], "sha256": first["sha256"]},
        "artifacts": used,
        "tasks": {
            label: {
                "split": opts.split,
                "seed": seeds[label],
                "n": len(problems[label]),
                "options": per_task[label],
            }
            for label in problems
        },
        "modes": first["modes"],
        "limit": opts.limit,
        "prompt_suffix": first["prompt_suffix"],
        "generation": {k: v for k, v in vars(opts.gen).items() if k != "memory"},
        "batch_size": opts.batch_size,
        "task_options": parse_task_options(opts.task_options),
        "device": first["device"],
        "dtype": first["dtype"],
        "world_size": world_size,
    }


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
        row = [_short(r["task"]), *([labels[r.get("artifact")]] if artifacts else [])]
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
            table.add_row(_short(task), str(index), question, str(first["gold"]), *cells)
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


def _short(label: str) -> str:
    """A task's display name: a data file by its file name."""
    return Path(label).name if "/" in label else label
