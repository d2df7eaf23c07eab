"""``memgen inspect-memory``: what the latent memory says, where it goes and what it does.

    memgen inspect-memory --artifact DIR --prompt "A question"      # one answer, in depth
    memgen inspect-memory --artifact DIR --data gsm_symbolic --limit 100 [--drop-cluster J]

One answer (``--prompt``): every insertion gets its nearest tokens, a logit lens, norm
percentiles, the attention later answer tokens pay it, and two ablations (the teacher-forced
Δ log-prob of the same answer without it; a regeneration without it). Many answers
(``--data``): every insertion gets nearest tokens and norms, the insertions are clustered
(k-means over mean-pooled latents, PCA and t-SNE plots, per-cluster statistics), and
``--drop-cluster J`` re-runs the evaluation with cluster J's insertions suppressed.

With ``memory.inject: kv`` the memory is the weaver's keys and values at K slots, at every
layer: nearest tokens (and clusters) read the weaver's final states at the slots, attention is
what later tokens pay the slot columns per layer, the ablations drop the slots or zero their
values, and the logit lens and latent norms, which mean nothing there, are marked not
applicable (``inspection/views.py``).

validate -> load -> generate with the trace -> probe -> cluster -> write. The artifact is only
read. The JSON layout is documented in docs/inspect-memory-schema.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memgen_cli.artifacts import artifact_digest, read_manifest, require_kind
from memgen_cli.config import GenerationConfig
from memgen_cli.console import make_console
from memgen_cli.data import get_task, to_messages
from memgen_cli.data.environment import GAME_TASKS, EnvironmentTask
from memgen_cli.data.extraction import extract_math_answer
from memgen_cli.errors import MemgenError, require_choice
from memgen_cli.evaluation.plan import parse_task_options, task_options
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.inspection import clusters as C
from memgen_cli.inspection import probe as P
from memgen_cli.inspection import report as R
from memgen_cli.inspection import slots as S
from memgen_cli.inspection import terminal as T
from memgen_cli.outputs import check_output
from memgen_cli.rendering import segments
from memgen_cli.stages.common import open_session, resolve_suffix, user_message
from memgen_cli.stages.inspect_episodes import check_games, inspect_games

# 2: `skipped` (boundaries a trained trigger did not weave at); 3: memory.inject kv views
# (`inject`, `views`, `weaver_lens`, `slot_norms`, `attention.per_layer`, `ablation.zero_values`)
# 4: games (`--data textworld:...`): `episodes`, insertions' `turn`
SCHEMA_VERSION = 4
DEFAULT_CLUSTERS = 4


@dataclass
class InspectOptions:
    artifact: Path | None
    prompt: str | None = None
    data: str | None = None
    limit: int = 100
    split: str | None = None
    top_k: int = 5
    clusters: int | None = None  # None: 4 with --data, no clustering with --prompt
    drop_cluster: int | None = None
    drop_rule: str = "paper"  # paper | nearest (see inspection/clusters.py)
    layers: bool = False
    html: Path | None = None
    json: bool = False
    output: Path | None = None
    memory: str | None = None  # None: full when the artifact has a trained trigger, else weaver
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8
    prompt_suffix: str | None = None
    base: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_base_mismatch: bool = False
    overwrite: bool = False  # replace an earlier inspect-memory output at ``output``/``html``
    task_options: list[str] = field(default_factory=list)  # KEY=VALUE, as eval takes them


@dataclass
class Job:
    """What every step needs: the model, its vocabulary, settings, and the report so far."""

    opts: InspectOptions
    model: object
    vocab: P.Vocab
    gen: GenerationConfig
    report: dict
    console: Console
    task: object = None
    examples: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    latents: list = field(default_factory=list)  # per insertion, in report order
    clock: float = field(default_factory=time.perf_counter)

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.report["timings"][key] = round(now - self.clock, 2)
        self.clock = now


def run(opts: InspectOptions, console: Console | None = None) -> dict:
    """Inspect, print (terminal view or JSON) and write the requested files; return the report."""
    console = console or make_console()
    note = make_console(stderr=True) if opts.json else console  # stdout stays pure JSON
    k = validate(opts)
    start = time.perf_counter()
    session = open_session(
        opts.base, opts.artifact, opts.device, opts.dtype, opts.allow_base_mismatch
    )
    memory = opts.memory or ("full" if session.has_trigger else "weaver")
    if memory == "full" and not session.has_trigger:
        raise MemgenError(
            "--memory full needs a trained trigger, and this artifact has none; use --memory weaver."
        )
    gen = GenerationConfig(
        max_new_tokens=opts.max_new_tokens, temperature=0.0, seed=opts.seed, memory=memory
    )
    suffix = resolve_suffix(session, opts.prompt_suffix, note)
    vocab = P.vocab_of(session.model)
    report = R.new_report(
        SCHEMA_VERSION, opts, session, artifact_digest(opts.artifact), memory, suffix, vocab
    )
    job = Job(opts, session.model, vocab, gen, report, note, clock=start)
    job.lap("load_s")
    if opts.prompt is not None:
        inspect_prompt(job, user_message(opts.prompt, suffix))
    else:
        given = parse_task_options(opts.task_options)
        job.task = get_task(opts.data, **task_options(opts.data, given, [session.manifest], note))
        job.examples = job.task.load(opts.split, opts.limit)
        if not job.examples:
            raise MemgenError(
                f"--data {opts.data} gave no examples (split {opts.split or job.task.default_split})."
            )
        system = (session.manifest.get("prompt") or {}).get("system")
        job.messages = [to_messages(ex, suffix, system) for ex in job.examples]
        if isinstance(job.task, EnvironmentTask):  # games: the latents of played episodes
            inspect_games(job, _describe)
        else:
            inspect_data(job)
    if k is not None:
        centroids = cluster(job, k)
        if opts.drop_cluster is not None:
            intervene(job, centroids)
    figures = R.figures(report, vocab)
    report["timings"]["total_s"] = round(time.perf_counter() - start, 2)
    R.write_outputs(report, figures, opts.output, opts.html, note)
    if opts.json:
        print(json.dumps(report, ensure_ascii=False))  # not rich: no wrapping, no markup
    else:
        T.print_terminal(console, report)
    return report


# ------------------------------------------------------------------------------ validate
def validate(opts: InspectOptions) -> int | None:
    """Check the options once; return the number of clusters to fit (None: no clustering)."""
    if opts.artifact is None:
        raise MemgenError(
            "inspect-memory needs --artifact DIR: a weaver artifact from `memgen sft-weaver` or "
            "`memgen grpo-weaver` (without one there is no memory to inspect)."
        )
    # Now, before any model loads, in the words of every command that reads a weaver: one that
    # is damaged or incomplete, or a baseline or retrieval artifact (no weaver, no memory).
    art = Path(opts.artifact)
    require_kind(read_manifest(art), art, "weaver")
    if (opts.prompt is None) == (opts.data is None):
        raise MemgenError(
            "Give exactly one of --prompt TEXT (one answer) or --data TASK --limit N (many)."
        )
    if opts.prompt is not None and not opts.prompt.strip():
        raise MemgenError("--prompt is empty; give the question to answer.")
    if opts.memory not in (None, "weaver", "full"):
        raise MemgenError(
            f'--memory must be weaver or full (inspection needs memory on); got "{opts.memory}".'
        )
    for name in ("top_k", "limit", "max_new_tokens", "batch_size"):
        if getattr(opts, name) < 1:
            raise MemgenError(
                f"--{name.replace('_', '-')} must be at least 1; got {getattr(opts, name)}."
            )
    k = opts.clusters if opts.clusters is not None else (DEFAULT_CLUSTERS if opts.data else None)
    if k is not None and k < 2:
        raise MemgenError(f"--clusters must be at least 2; got {k}.")
    require_choice("--drop-rule", opts.drop_rule, C.DROP_RULES)
    if opts.data is not None and opts.data.startswith(GAME_TASKS):
        check_games(opts)
    if opts.drop_cluster is not None:
        if opts.data is None:
            raise MemgenError(
                "--drop-cluster re-runs an evaluation, so it needs --data TASK --limit N."
            )
        if not 0 <= opts.drop_cluster < k:
            raise MemgenError(
                f"--drop-cluster must name a cluster from 0 to {k - 1}; got {opts.drop_cluster}."
            )
    for target in (opts.html, opts.output):
        if target is not None and art.resolve() in [
            Path(target).resolve(),
            *Path(target).resolve().parents,
        ]:
            raise MemgenError(
                f"{target} lies inside the artifact {art}; inspect-memory never writes there."
            )
    if opts.output is not None:
        check_output(opts.output, kind="inspect-memory", overwrite=opts.overwrite)
    if opts.html is not None:
        check_output(opts.html, kind="html", overwrite=opts.overwrite, flag="--html")
    return k


def _require_insertions(found: list, what: str) -> None:
    if not found:
        raise MemgenError(
            f"No memory was inserted for {what}: the weaver wove nothing (no prompt latents, and no "
            "clause boundary where the trigger invoked it). Try a longer answer (--max-new-tokens), "
            "--memory weaver, or a question whose answer has several clauses."
        )


# ------------------------------------------------------------------------------ one answer
def inspect_prompt(job: Job, message: dict) -> None:
    """Generate one answer with the trace, then probe every insertion in depth."""
    model, report = job.model, job.report
    enc = encode_prompts(model.tokenizer, [[message]], model.device)
    prompt_ids = enc["input_ids"][0].tolist()
    out = generate(model, enc["input_ids"], enc["attention_mask"], job.gen, keep_logits=True)
    found = sorted(out.trace.for_row(0), key=lambda ins: ins.token_index)
    _require_insertions(found, "this prompt")
    tokens, eos = out.tokens[0], P.emitted_eos(out)
    completion = model.tokenizer.decode(tokens, skip_special_tokens=True)
    example = R.example_record(0, message["content"], completion, len(tokens), eos is not None)
    example["answer"] = extract_math_answer(completion)
    report["examples"].append(example)
    report["skipped"] = R.skipped_records(model.tokenizer, out.trace, 0, 0, tokens)
    job.latents = [S.memory_vectors(ins, model.kv) for ins in found]
    job.lap("generate_s")

    if model.kv:  # keys and values at every layer: recomputed, see inspection/slots.py
        memory = S.weave(model, S.slot_stream(model, prompt_ids, tokens, eos, found))
        implementation, probes = S.probe_slots(model, memory)

        def logprob(**ablate) -> float:  # drop=i: slots masked; zero_values=i: values zeroed
            return float(S.continuation_logprobs(model, memory, **ablate).sum())
    else:
        stream = P.build_stream(model, prompt_ids, tokens, eos, found)
        implementation, probes = P.probe_latents(model, job.vocab, stream, job.opts.layers)

        def logprob(drop: int | None = None) -> float:  # drop=i: chunk i left out
            read = stream if drop is None else P.without(stream, model, drop)
            return float(P.continuation_logprobs(model, read).sum())

    report["attention_implementation"] = implementation
    for i, (ins, fields) in enumerate(zip(found, probes, strict=True)):
        report["insertions"].append({**_describe(job, ins, i, 0, tokens, prompt_ids), **fields})
    example["segments"] = R.answer_segments(
        segments(model.tokenizer, tokens, found), report["insertions"]
    )
    job.lap("probe_s")

    logp_with = logprob()
    regenerated = P.ablated_generations(model, prompt_ids, job.gen, found)
    for i, rec in enumerate(report["insertions"]):
        other = model.tokenizer.decode(regenerated.tokens[i], skip_special_tokens=True)
        rec["ablation"] = R.ablation_record(
            logp_with,
            logprob(drop=i),
            completion,
            other,
            example["answer"],
            extract_math_answer(other),
        )
        if model.kv:
            rec["ablation"]["zero_values"] = R.zero_values_record(logp_with, logprob(zero_values=i))
    job.lap("ablation_s")


def _describe(job: Job, ins, number: int, example: int, tokens, prompt_ids) -> dict:
    """``report.describe`` of one insertion; with kv, also the weaver lens (from the trace)."""
    model = job.model
    rec = R.describe(
        model.tokenizer, job.vocab, ins, number, example, tokens, prompt_ids, job.opts.top_k,
        kv=model.kv,
    )  # fmt: skip
    if model.kv:
        states = ins.weaver_states.to(model.device, model.dtype)
        rec["weaver_lens"] = P.logit_lens(model, job.vocab, states)
    return rec


# ----------------------------------------------------------------------------- many answers
def _generate_all(job: Job, label: str, keep=None):
    """Yield (example index, prompt ids, output, row) for every prompt, batched, with progress."""
    model, size = job.model, job.opts.batch_size
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=job.console, transient=True) as progress:
        bar = progress.add_task(label, total=len(job.messages))
        for start in range(0, len(job.messages), size):
            chunk = job.messages[start : start + size]
            enc = encode_prompts(model.tokenizer, chunk, model.device)
            out = generate(model, enc["input_ids"], enc["attention_mask"], job.gen, keep=keep)
            for row in range(len(chunk)):
                ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                yield start + row, ids, out, row
            progress.advance(bar, len(chunk))


def _grade(job: Job, out, row: int, e: int) -> tuple[str, float]:
    completion = job.model.tokenizer.decode(out.tokens[row], skip_special_tokens=True)
    return completion, float(job.task.grade(completion, job.examples[e]))


def inspect_data(job: Job) -> None:
    """Answer every example with the trace, grade it, and describe every insertion."""
    model, report = job.model, job.report
    for e, prompt_ids, out, row in _generate_all(job, "inspecting"):
        tokens, ex = out.tokens[row], job.examples[e]
        found = sorted(out.trace.for_row(row), key=lambda ins: ins.token_index)
        completion, grade = _grade(job, out, row, e)
        record = R.example_record(e, ex.question, completion, len(tokens), out.finished[row], ex.id)
        record.update(answer=job.task.extract(completion), gold=ex.answer, correct=grade)
        report["skipped"] += R.skipped_records(model.tokenizer, out.trace, row, e, tokens)
        first = len(report["insertions"])
        for ins in found:
            rec = _describe(job, ins, len(report["insertions"]), e, tokens, prompt_ids)
            rec["correct"] = grade
            report["insertions"].append(rec)
            job.latents.append(S.memory_vectors(ins, model.kv))
        pieces = segments(model.tokenizer, tokens, found)
        record["segments"] = R.answer_segments(pieces, report["insertions"][first:])
        report["examples"].append(record)
    _require_insertions(report["insertions"], f"any of the {len(job.examples)} examples")
    report["accuracy"] = round(
        sum(ex["correct"] for ex in report["examples"]) / len(report["examples"]), 4
    )
    job.lap("generate_s")


def cluster(job: Job, k: int):
    """k-means over the mean-pooled latents of every insertion; PCA and t-SNE; statistics."""
    recs, seed = job.report["insertions"], job.opts.seed
    if k > len(recs):
        raise MemgenError(
            f"--clusters {k} is more than the {len(recs)} insertion{'s' * (len(recs) != 1)} found. "
            + (f"Use --clusters {len(recs)} or fewer, or " if len(recs) >= 2 else "")
            + "inspect more answers (--data TASK --limit N)."
        )
    points = C.mean_pool(job.latents)
    fit = C.kmeans(points, k, seed)
    proj = C.project(points, seed)
    for rec, label in zip(recs, fit.labels, strict=True):
        rec["cluster"] = int(label)
    job.report["clusters"] = {
        "k": k,
        "seed": seed,
        "method": "k-means (k-means++, 10 restarts) on mean-pooled "
        + ("weaver final states at the slots" if job.model.kv else "latents")
        + "; clusters numbered by size",
        "inertia": round(fit.inertia, 4),
        "pca_explained_variance": [round(v, 4) for v in proj.explained],
        "tsne_perplexity": proj.perplexity,
        "centroid_nearest_tokens": C.centroid_tokens(fit.centroids, job.vocab, job.opts.top_k),
        "stats": C.cluster_stats(fit.labels, recs, k),
        "points": {
            "pca": proj.pca.round(4).tolist(),
            "tsne": None if proj.tsne is None else proj.tsne.round(4).tolist(),
        },
    }
    job.lap("cluster_s")
    return fit.centroids


def intervene(job: Job, centroids) -> None:
    """Re-run the evaluation with every insertion in cluster J suppressed (``--drop-rule``).

    The rule is applied to each insertion as it is woven in the re-run (latents woven after a
    dropped one differ from the first run's). How the rule agrees with the first run's k-means
    labels is reported, and a rule that selects far more than the cluster gets a warning.
    """
    j, rule = job.opts.drop_cluster, job.opts.drop_rule
    in_cluster = C.drop_rule(centroids, job.vocab, j, rule)
    labels = [r["cluster"] for r in job.report["insertions"]]
    first = [in_cluster(x) for x in job.latents]
    size, selects = labels.count(j), sum(first)
    warning = None
    if selects > 2 * size:
        warning = (
            f"the {rule} rule selects {selects} of the first run's {len(first)} insertions while "
            f"cluster {j} holds {size}: the latents lie closer to every centroid than to any token, "
            "so this drops far more than the cluster. Try --drop-rule nearest."
        )
        job.console.print(f"[yellow]warning:[/] {warning}")
    counts = {"seen": 0, "dropped": 0}

    def keep(ins) -> bool:
        drop = in_cluster(S.memory_vectors(ins, job.model.kv))
        counts["seen"] += 1
        counts["dropped"] += drop
        return not drop

    runs = _generate_all(job, f"without cluster {j}", keep)
    grades = [_grade(job, out, row, e)[1] for e, _, out, row in runs]
    baseline = [ex["correct"] for ex in job.report["examples"]]
    job.report["drop_cluster"] = {
        "cluster": j,
        "rule_name": rule,
        "rule": C.rule_text(rule, j),
        "accuracy_with": round(sum(baseline) / len(baseline), 4),
        "accuracy_without": round(sum(grades) / len(grades), 4),
        "insertions_seen": counts["seen"],
        "insertions_dropped": counts["dropped"],
        "answers_changed": sum(a != b for a, b in zip(baseline, grades, strict=True)),
        "first_run": {
            "cluster_size": size,
            "rule_selects": selects,
            "rule_selects_in_cluster": sum(
                f and lab == j for f, lab in zip(first, labels, strict=True)
            ),
        },
        "warning": warning,
    }
    job.lap("intervention_s")
