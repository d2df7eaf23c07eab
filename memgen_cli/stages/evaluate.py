"""``memgen eval``: the same reasoner with memory off, with the weaver, and with weaver +
trigger, and any number of artifacts (weavers, LoRA baselines) side by side, on exactly the
same problems, in one run. The memory mode is a field of the GenerationConfig; a baseline runs
as the adapted reasoner, memory off: a LoRA merged into it, or prompt or prefix tuning's virtual
tokens as a fixed cache prefix before every prompt (``models/prompt_learning.py``). A retrieval
artifact runs as the plain reasoner with its retrieved examples before each question, and with
``--retrieval`` beside every weaver too (``retrieval/prompt.py``).

Reads top to bottom: validate the request (artifacts and their modes, tasks) -> load the
problems once -> per artifact (one model in memory at a time), per task, cut the problems into
batches once; per mode, generate and grade them -> gather on rank 0 -> one row per (task,
artifact, mode), each with a paired figure against its task's first row (difference ± s.e.,
exact McNemar p) -> table, ``metrics.json`` and ``predictions.jsonl``. This module is the run;
its parts are library code in ``memgen_cli.evaluation`` (plan, heldout, stats, report).

Under ``torchrun``/``accelerate launch`` whole *batches* are dealt round-robin to the
ranks. A batch holds the same problems whatever the number of processes, so a multi-process
run computes exactly what a single process computes, only spread out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memgen_cli import __version__, distributed
from memgen_cli.artifacts import artifact_digest, load_baseline, read_manifest
from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.console import make_console
from memgen_cli.data import Example, Task, get_task, to_messages
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.gym import GraderErrors, grade_checked
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.episodes import episode_figures, episode_line, play_batch
from memgen_cli.evaluation.heldout import contamination_warnings, data_seed
from memgen_cli.evaluation.plan import (
    Entry,
    Problem,
    artifact_paths,
    display_name,
    make_batches,
    parse_specs,
    parse_task_options,
    plan_entries,
    task_options,
)
from memgen_cli.evaluation.report import examples_table, results_table, write_outputs
from memgen_cli.evaluation.stats import add_paired, summarize
from memgen_cli.generation import GenerationOutput, encode_prompts, generate, prompt_learning
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.outputs import check_output
from memgen_cli.retrieval import Shots, open_shots
from memgen_cli.stages.common import Session, open_session, resolve_suffix
from memgen_cli.versions import environment_versions, version_differences

# How an entry answers a batch: (input_ids, attention_mask, GenerationConfig) -> its output.
Answer = Callable[..., GenerationOutput]


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
    retrieval: Path | None = None
    """A retrieval artifact whose examples go before the questions of every weaver too: each
    weaver runs again, in its modes, with them (rows labelled "W+R")."""


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
    entries = plan_entries(artifact_paths(opts.artifact), opts.memory, notes, opts.retrieval)
    manifests = [e.manifest for e in entries if e.manifest is not None]
    manifests += [read_manifest(opts.retrieval)] if opts.retrieval else []  # its data is held out
    options = parse_task_options(opts.task_options)
    per_task = {
        label: task_options(label, options, manifests, notes) for label in parse_specs(opts.data)
    }
    tasks = {label: get_task(label, **kw) for label, kw in per_task.items()}
    check_episode_entries(tasks, entries)
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
        session, answer = open_entry(entry, opts, device)
        suffix = resolve_suffix(session, opts.prompt_suffix, notes)
        system = ((entry.manifest or {}).get("prompt") or {}).get("system")
        shots, framing = None, None
        if entry.retrieval is not None:  # its examples are found by this entry's reasoner
            shots = open_shots(entry.retrieval, session.base, opts.allow_base_mismatch)
            framing = shots.key()
        used.append(entry_config(entry, session, suffix))
        if changed := version_differences((entry.manifest or {}).get("versions")):
            notes.print(
                f"{display_name(entry.label)}: made with other versions ({', '.join(changed)})"
            )
        for label, task in tasks.items():
            tick = time.perf_counter()
            items = problem_items(problems[label], suffix, system, shots, session)
            searched = round(time.perf_counter() - tick, 3)  # retrieval: not in samples/s
            batches = make_batches(session.model.tokenizer, items, opts.batch_size)
            mine = distributed.shard(list(enumerate(batches)), dist.rank, dist.world_size)
            for mode in entry.modes:
                key = same_run_key(entry, session, mode, (label, suffix, system, framing))
                if key in done:
                    first, records, row = done[key]
                    if dist.is_main:
                        notes.print(
                            f"{display_name(entry.label)} · memory {mode}: the same model, "
                            f"prompt and problems as {display_name(first)}'s; its answers are "
                            "reused"
                        )
                        results.append({**row, "artifact": entry.label, "reused_from": first})
                        predictions += [{**r, "artifact": entry.label} for r in records]
                    continue
                gen = replace(opts.gen, memory=mode, seed=sampling_seed)
                part = run_mode(session, answer, task, label, mine, gen, notes, dist.is_main)
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
                if shots is not None:
                    row["retrieval_s"] = searched
                errors = [r["grader_error"] for r in records if r["grader_error"]]
                GraderErrors(len(records), errors).check(f"{label} (memory {mode})")
                if isinstance(task, EnvironmentTask):
                    row.update(episode_figures(records))
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
        for row in results:
            if "mean_steps" in row:
                console.print(episode_line(row), highlight=False)
        if opts.show:
            console.print(examples_table(predictions, opts.show))
    return metrics


def check_episode_entries(tasks: dict[str, Task], entries: list[Entry]) -> None:
    """Environment tasks play episodes with memgen's generation: refuse the entries that
    answer otherwise (retrieved examples, prompt or prefix tuning's virtual tokens)."""
    games = [label for label, task in tasks.items() if isinstance(task, EnvironmentTask)]
    for entry in entries if games else []:
        method = (entry.manifest or {}).get("method", "lora")
        if entry.retrieval is not None or entry.is_retrieval or method != "lora":
            raise MemgenError(
                f"{display_name(entry.label)} cannot play {games[0]}: its episodes run weaver "
                "artifacts, LoRA baselines and the plain reasoner (not retrieval artifacts or "
                "prompt or prefix tuning)."
            )


# --------------------------------------------------------------------------- models
def open_entry(entry: Entry, opts: EvalOptions, device) -> tuple[Session, Answer]:
    """The model of one entry, and how it answers a batch ``(input_ids, attention_mask,
    GenerationConfig) -> GenerationOutput``: memgen's generation, except for prompt and prefix
    tuning baselines. A LoRA baseline's adapter is merged into its reasoner, so that the
    memory-off path of generation runs the adapted weights; a prompt or prefix baseline's
    virtual tokens are a fixed cache prefix, which memgen's loop has no place for: its rows
    decode after it (``prompt_learning.generate_after``, memory off's steps). A retrieval
    artifact alone runs the plain reasoner it was built on (its examples: ``problem_items``)."""
    if entry.is_retrieval:
        name = opts.base or entry.manifest["reasoner"]["name"]
        plain = open_session(name, None, device, opts.dtype)
        return Session(plain.model, plain.base, entry.manifest), partial(generate, plain.model)
    if not entry.is_baseline:
        session = open_session(opts.base, entry.path, device, opts.dtype, opts.allow_base_mismatch)
        return session, partial(generate, session.model)
    loaded = load_base(opts.base, device, opts.dtype) if opts.base else None
    peft, manifest, base = load_baseline(
        entry.path,
        loaded,
        device=device,
        dtype=opts.dtype,
        allow_base_mismatch=opts.allow_base_mismatch,
    )
    if manifest["method"] != "lora":
        prefix = prompt_learning.virtual_prefix(peft)
        model = MemGenModel(peft.get_base_model(), base.tokenizer, MemoryConfig()).eval()
        answer = partial(prompt_learning.generate_after, model, prefix)
        return Session(model, base, manifest), answer
    merged = peft.merge_and_unload()
    adapted = LoadedBase(merged, base.tokenizer, base.name, base.source, base.fingerprint)
    model = MemGenModel(merged, base.tokenizer, MemoryConfig()).eval()
    return Session(model, adapted, manifest), partial(generate, model)


def problem_items(
    examples: list[Example], suffix: str, system: str | None, shots: Shots | None, session
) -> list[Problem]:
    """A task's problems as one entry asks them: with a retrieval artifact (``shots``), each
    question after its retrieved examples (found by the session's own reasoner)."""
    items = [Problem(i, ex, to_messages(ex, suffix, system)) for i, ex in enumerate(examples)]
    if shots is None:
        return items
    messages, ids = shots.frame(
        session.model, [p.messages for p in items], [ex.question for ex in examples], suffix
    )
    return [
        replace(p, messages=m, retrieved=r) for p, m, r in zip(items, messages, ids, strict=True)
    ]


def entry_config(entry: Entry, session: Session, suffix: str) -> dict:
    return {
        "path": entry.label,
        "sha256": None if entry.path is None else artifact_digest(entry.path),
        "kind": (entry.manifest or {}).get("kind", "plain"),
        **({"retrieval": str(entry.retrieval)} if entry.retrieval else {}),
        "modes": entry.modes,
        "prompt_suffix": suffix,
        "base": {"name": session.base.name, "fingerprint": session.base.fingerprint},
        "device": str(session.model.device),
        "dtype": str(session.base.model.dtype).removeprefix("torch."),
        "versions": (entry.manifest or {}).get("versions"),  # the environment that made it
    }


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


# --------------------------------------------------------------------------- generation
def run_mode(
    session: Session,
    answer: Answer,
    task: Task,
    label: str,
    batches,
    gen: GenerationConfig,
    notes,
    show: bool,
) -> dict:
    """Generate (``answer``, ``open_entry``'s) and grade this rank's batches in one memory
    mode."""
    total = sum(len(batch) for _, batch in batches)
    model, tok = session.model, session.model.tokenizer
    records, seconds, grade_s = [], 0.0, 0.0
    name = TextColumn(f"{display_name(label)} · memory {gen.memory}")
    columns = [name, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    live = show and notes.is_terminal  # a batch job's log gets a line per batch instead
    with Progress(*columns, console=notes, transient=True, disable=not live) as progress:
        bar = progress.add_task("eval", total=total)
        for number, batch in batches:
            # Seeded per batch, so sampling does not depend on how batches are spread.
            seeded = replace(gen, seed=gen.seed + number)
            if isinstance(task, EnvironmentTask):  # each problem is a game: play episodes
                tick = time.perf_counter()
                records += play_batch(model, task, label, batch, seeded)
                seconds += time.perf_counter() - tick
            else:
                enc = encode_prompts(tok, [p.messages for p in batch], model.device)
                tick = time.perf_counter()
                out = answer(enc["input_ids"], enc["attention_mask"], seeded)
                seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                records += [
                    prediction(task, label, gen.memory, p, out, row, tok)
                    for row, p in enumerate(batch)
                ]
                grade_s += time.perf_counter() - tick
            progress.advance(bar, len(batch))
            if show and not live:
                notes.print(f"{display_name(label)} · memory {gen.memory}: {len(records)}/{total}")
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
        **({} if problem.retrieved is None else {"retrieved": problem.retrieved}),
    }


# --------------------------------------------------------------------------- run record
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
