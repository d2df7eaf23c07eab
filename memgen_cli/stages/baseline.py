"""``memgen baseline sft``: LoRA-SFT of the reasoner itself, the comparison a weaver must beat.

The paper sets MemGen-SFT beside LoRA-SFT of the same model on the same data (Table 3). This
stage trains that LoRA with TRL's ``SFTTrainer``, through its public API, at the weaver's
budget: the same examples and tokenisation as ``sft-weaver`` (the chat prompt rendered as
``generate`` renders it, the solution + EOS as target, loss on the target only), the same
optimizer, steps, batches and learning-rate schedule (``training/sft_run.py`` maps one recipe
section onto both trainers), and a LoRA rank whose trainable-parameter count is closest to the
weaver's (``lora.r: null``; both counts are recorded). Reads top to bottom:

1. validate: the config, the resume point, the task and its data;
2. build: the base model, the samples (pre-tokenised, with TRL's ``completion_mask``), the
   LoRA config, TRL's ``SFTTrainer`` with our progress, metrics and Ctrl-C callbacks;
3. loop: ``SFTTrainer.train`` (optimizer, schedule, checkpoints, ``--resume``, torchrun);
4. save: the main process writes the baseline artifact atomically (a PEFT adapter directory
   plus ``memgen.json`` of kind ``baseline``).

The pieces every baseline method shares (LoRA settings at the weaver's budget, callbacks, the
train call with Ctrl-C, the summary's common fields, the artifact) are the helpers below;
``stages/baseline_grpo.py`` (``memgen baseline grpo``) builds on them.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import datasets
import torch
import trl
from peft import LoraConfig
from rich.console import Console
from rich.table import Table
from transformers import PrinterCallback, set_seed

from memgen_cli.artifacts import check_output, save_baseline
from memgen_cli.config import (
    BaselineConfig,
    BaselineGRPOConfig,
    BaselineLoraConfig,
    MemoryConfig,
    dump_yaml,
    load_recipe,
    to_dict,
)
from memgen_cli.console import make_console
from memgen_cli.data import Task
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.models.weaver import Weaver
from memgen_cli.training.sft_data import tokenize_samples
from memgen_cli.training.sft_run import (
    ResumedIntervals,
    begin_checkpoints,
    data_config,
    load_examples,
    mean_loss,
    resume_point,
    trainer_arguments,
    validate_memory,
    validate_training,
)
from memgen_cli.training.trainer_parts import (
    MetricsLog,
    RichProgress,
    StopOnSignal,
    Throughput,
    world_size,
)

METHODS = ("sft", "grpo")
# The keys of a weaver's recipe a baseline accepts and does not read, so a resume ignores them:
# those that place latents, and the memory fields that do not set the weaver's parameter count.
WEAVER_ONLY = (
    "training.schedule",
    "training.prompt_insertion",
    "training.memory",
    "memory.delimiters",
    "memory.max_inference_insertions",
    "memory.lora_alpha",
    "memory.lora_dropout",
    "memory.projection_init",
    "memory.trigger_hidden",
    "memory.trigger_threshold",
)
IGNORE = -100


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after writing a resumable checkpoint."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------- config
def resolve_config(
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: str | None = None,
    data: str | None = None,
    columns: dict[str, str] | None = None,
    task_options: dict | None = None,
    output: str | Path | None = None,
    report_to: str | None = None,
) -> BaselineConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win)."""
    cfg = load_recipe(BaselineConfig, recipe, overrides)
    if output is None and "output" not in set_keys(overrides):
        output = counterpart(recipe, cfg.output, "baseline-sft")
    model = cfg.model if base is None else dataclasses.replace(cfg.model, base=base)
    t = cfg.training
    if report_to is not None:
        t = dataclasses.replace(t, report_to=report_to)
    return dataclasses.replace(
        cfg,
        model=model,
        data=data_config(cfg.data, data, columns, task_options),
        training=t,
        output=str(output) if output else cfg.output,
    )


# Recipes are named for their stage (recipes/<model>/<task>/<stage>.yaml). A weaver stage's
# recipe names weaver artifacts in `output` (and grpo-weaver's `init`, an SFT weaver); when it
# drives a baseline, the baseline's own artifacts are the ones beside them.
WEAVER_RECIPES = ("sft-weaver", "grpo-weaver")


def counterpart(recipe: str | Path | None, path: str | None, name: str) -> str | None:
    """``path`` as a baseline reads it from ``recipe``: in a weaver stage's recipe a weaver
    artifact, whose baseline is the directory ``name`` beside it (``runs/x/sft-weaver`` ->
    ``runs/x/baseline-sft``); in any other recipe, ``path`` itself.

    >>> counterpart("recipes/a/sft-weaver.yaml", "runs/a/sft-weaver", "baseline-sft")
    'runs/a/baseline-sft'
    >>> counterpart("recipes/a/baseline-sft.yaml", "runs/a/lora", "baseline-sft")
    'runs/a/lora'
    """
    if recipe is None or path is None or Path(recipe).stem not in WEAVER_RECIPES:
        return path
    return str(Path(path).with_name(name))


def set_keys(overrides: list[str] | None) -> set[str]:
    """The keys ``--set`` gives: those are the user's own, never mapped."""
    return {item.split("=", 1)[0].strip() for item in overrides or []}


def checkpoint_dir(cfg: BaselineConfig | BaselineGRPOConfig) -> Path:
    out = Path(cfg.output)
    return out.with_name(out.name + ".checkpoints")


def validate_lora(lora: BaselineLoraConfig) -> None:
    if lora.r is not None and lora.r < 1:
        raise MemgenError(f"lora.r must be >= 1 (or null to match the weaver); got {lora.r}.")
    if not 0.0 <= lora.dropout < 1.0:
        raise MemgenError(f"lora.dropout must be in [0, 1); got {lora.dropout}.")
    if not lora.targets:
        raise MemgenError("lora.targets needs at least one module name (e.g. [q_proj, v_proj]).")


def validate(cfg: BaselineConfig, resume: str | None) -> Path | None:
    """Check values the dataclass types cannot; return the checkpoint to resume from."""
    validate_lora(cfg.lora)
    validate_training(cfg.training, cfg.data)
    validate_memory(cfg.memory)
    return resume_point(checkpoint_dir(cfg), resume, to_dict(cfg), WEAVER_ONLY)


# ----------------------------------------------------------------------------- budget
def lora_targets(model, targets: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers a LoRA with these target names attaches to (PEFT's suffix match)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.split(".")[-1] == t for t in targets)
    ]


def lora_params_per_rank(model, targets: list[str]) -> int:
    """A LoRA of rank r on these layers trains r × this many parameters (A: r×in, B: out×r)."""
    return sum(m.in_features + m.out_features for _, m in lora_targets(model, targets))


def weaver_trainable_params(model, memory: MemoryConfig) -> int:
    """What ``sft-weaver`` trains with this memory config on ``model`` (shared backbone): its
    LoRA plus the weaver's own tensors (queries, norms, scales, and both projections unless
    ``memory.inject`` is kv, which has none)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        own = Weaver(
            hidden,
            hidden,
            memory.prompt_latents,
            memory.inference_latents,
            projections=memory.inject != "kv",
        )
    lora = memory.lora_r * lora_params_per_rank(model, memory.lora_targets)
    return lora + sum(p.numel() for p in own.parameters())


def matched_rank(model, targets: list[str], budget: int) -> int:
    """The rank whose LoRA parameter count is closest to ``budget`` (at least 1)."""
    unit = lora_params_per_rank(model, targets)
    return max(1, round(budget / unit))


def lora_settings(
    base: LoadedBase, cfg: BaselineLoraConfig, weaver: MemoryConfig
) -> tuple[dict, LoraConfig, int]:
    """(the LoRA settings recorded in the manifest, PEFT's config, the weaver's trainable
    parameter count): the rank is ``cfg.r``, or the weaver's budget when that is null."""
    if not lora_targets(base.model, cfg.targets):
        raise MemgenError(
            f"lora.targets {cfg.targets} match no linear layer of {base.name}; name modules "
            "of this architecture (e.g. q_proj, v_proj)."
        )
    weaver_count = weaver_trainable_params(base.model, weaver)
    rank = cfg.r or matched_rank(base.model, cfg.targets, weaver_count)
    lora = {
        "r": rank,
        "alpha": cfg.alpha or 2 * rank,
        "dropout": cfg.dropout,
        "targets": list(cfg.targets),
        "rank_rule": "set" if cfg.r else "matched to the weaver's trainable parameters",
    }
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["targets"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return lora, peft_config, weaver_count


# ------------------------------------------------------------------------------- data
def as_dataset(pairs: list[tuple[list[int], int]]) -> datasets.Dataset:
    """TRL's pre-tokenised format: ``input_ids`` and a ``completion_mask`` (1 on the target)."""
    rows = [
        {"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)} for ids, n in pairs
    ]
    return datasets.Dataset.from_list(rows)


@torch.no_grad()
def heldout_loss(model, pairs: list[tuple[list[int], int]], pad_id: int, batch: int) -> float:
    """Token-weighted cross-entropy on the targets of held-out samples (prompt masked)."""
    was_training, device = model.training, model.get_input_embeddings().weight.device
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
        for row, (seq, n) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, n : len(seq)] = ids[row, n : len(seq)]
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(loss)
        count += int((target != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------- run
def run(
    cfg: BaselineConfig,
    resume: str | None = None,
    console: Console | None = None,
    callbacks: list | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the LoRA baseline and write the artifact to ``cfg.output``; returns its path.

    ``overwrite``: replace an artifact already at ``cfg.output`` (a ``resume`` consents too);
    anything else there is refused before any model is loaded (``check_output``).
    """
    console = console or make_console()
    # 1. validate
    resume_from = validate(cfg, resume)
    check_output(cfg.output, kind="artifact", overwrite=overwrite or resume is not None)
    task, train_examples, held_examples, data_seed = load_examples(cfg)

    # 2. build
    d, t = cfg.data, cfg.training
    set_seed(t.seed)
    base = load_base(cfg.model.base, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    tok = base.tokenizer
    train, dropped = tokenize_samples(tok, train_examples, d.prompt_suffix, d.system, d.max_length)
    held, held_dropped = tokenize_samples(
        tok, held_examples, d.prompt_suffix, d.system, d.max_length
    )
    if not train:
        raise MemgenError(
            f"All {dropped} training samples are longer than data.max_length={d.max_length} "
            "tokens; raise it with --set data.max_length=N."
        )
    lora, peft_config, weaver_count = lora_settings(base, cfg.lora, cfg.memory)
    ckpts = checkpoint_dir(cfg)
    args = trl.SFTConfig(
        **trainer_arguments(t, ckpts, base.model.device),
        completion_only_loss=True,  # loss on the target only, as sft-weaver
        max_length=None,  # too-long samples were dropped above, never truncated
        activation_checkpointing=False,  # TRL turns it on by default; sft-weaver does not
        dataset_num_proc=None,
    )
    main = args.process_index == 0
    say = console.print if main else (lambda *a, **k: None)
    losses: dict[str, float] = {}
    if held and main and resume_from is None:
        # LoRA's B starts at zero: before training, the adapted reasoner is the plain one.
        losses["memory_off"] = heldout_loss(base.model, held, tok.pad_token_id, t.batch_size)
    if main:  # a resumed run reads back what its fresh start measured
        losses = begin_checkpoints(ckpts, cfg, resume_from, losses)
    clock = Throughput(t.batch_size * t.grad_accumulation * args.world_size)
    stop = StopOnSignal()
    datasets.disable_progress_bars()  # TRL maps the dataset once; no bar for that
    trainer = trl.SFTTrainer(
        model=base.model,
        args=args,
        train_dataset=as_dataset(train),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=trainer_callbacks(RichProgress(clock, console), ckpts, clock, stop, callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress replaces the raw dict printer
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"baseline sft: LoRA r {lora['r']} on {', '.join(lora['targets'])}, {trainable:,} trainable "
        f"parameters (the weaver: {weaver_count:,}); {len(train)} samples from {task.name} "
        f"({dropped} dropped as longer than {d.max_length} tokens), {world_size()} process(es)"
        + (f", resuming from {resume_from}" if resume_from else "")
    )
    if resume == "auto" and resume_from is None:
        say(f"--resume auto: no checkpoint in {ckpts}, starting from scratch")

    # 3. loop
    wall = fit(trainer, resume_from, stop, ckpts)

    # 4. save (main process; the others wait so that the run ends together)
    if main:
        if held:
            losses["lora_final"] = heldout_loss(model, held, tok.pad_token_id, t.batch_size)
        logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        summary = {
            "stage": "baseline-sft",
            "method": "lora-sft",
            **data_summary(task, cfg, data_seed),
            "samples": len(train),
            "dropped_too_long": dropped,
            "heldout_samples": len(held),
            "heldout_dropped_too_long": held_dropped,
            "heldout_loss": {k: round(v, 5) for k, v in losses.items()},
            "final_loss": logged[-1] if logged else None,
            "mean_loss": mean_loss(trainer.state.log_history),
            **run_summary(trainer, clock, wall, resume_from),
        }
        budget = {"trainable_params": trainable, "weaver_trainable_params": weaver_count}
        out = save(model, base, cfg, lora, budget, summary)
        console.print(summary_table(summary, lora, budget, out))
    trainer.accelerator.wait_for_everyone()
    return Path(cfg.output)


# ---------------------------------------------------------------------- shared by methods
def trainer_callbacks(progress, ckpts: Path, clock: Throughput, stop: StopOnSignal, extra) -> list:
    """Progress line, ``metrics.jsonl``, Ctrl-C, resume-proof logging, then the caller's own
    callbacks."""
    log = MetricsLog(ckpts / "metrics.jsonl", clock)
    return [progress, log, stop, ResumedIntervals(), *(extra or [])]


def fit(trainer, resume_from: Path | None, stop: StopOnSignal, ckpts: Path):
    """``trainer.train`` from the resume point; returns its wall seconds. Raises
    ``TrainingInterrupted`` after a Ctrl-C checkpoint; on a ``MemgenError`` (a reward function
    failing, say) a fresh run leaves no checkpoint folder behind."""
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except MemgenError:
        fresh = resume_from is None and not list(ckpts.glob("checkpoint-*"))
        if trainer.args.process_index == 0 and fresh:
            shutil.rmtree(ckpts, ignore_errors=True)
        raise
    if stop.stopped_at is not None:
        raise TrainingInterrupted(ckpts / f"checkpoint-{stop.stopped_at}")
    return time.perf_counter() - started


def data_summary(task: Task, cfg, data_seed: int | None) -> dict:
    """What the run trained on, as ``memgen eval`` reads it back (task, options, seeds)."""
    d = cfg.data
    return {
        "task": task.name,
        "data": d.path or d.task,
        "split": d.split,
        "task_options": dict(d.options),
        "data_seed": data_seed,
        "eval_seed": task.eval_seed,
        "training_seed": cfg.training.seed,
    }


def run_summary(trainer, clock: Throughput, wall: float, resume_from: Path | None) -> dict:
    state = trainer.state
    return {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "samples_per_s": clock.rate(state.global_step),
        "wall_s": round(wall, 1),
        "world_size": trainer.args.world_size,
        "resumed_from": str(resume_from) if resume_from else None,
    }


def save(model, base: LoadedBase, cfg, lora: dict, budget: dict, summary: dict, parent=None):
    """The baseline artifact (main process), then the finished run's checkpoints removed."""
    ckpts = checkpoint_dir(cfg)
    d = cfg.data
    out = save_baseline(
        model,
        base,
        cfg.output,
        lora=lora,
        budget=budget,
        prompt={"prompt_suffix": d.prompt_suffix, "system": d.system},
        recipe_yaml=dump_yaml(cfg),
        training=summary,
        metrics_file=ckpts / "metrics.jsonl",
        parent=parent,
    )
    shutil.rmtree(ckpts, ignore_errors=True)  # the run is finished: nothing to resume
    return out


def summary_table(s: dict, lora: dict, budget: dict, out: Path) -> Table:
    table = Table(title=f"baseline sft → {out}", show_header=False)
    rows = [
        ("task", f"{s['task']} ({s['samples']} samples, {s['dropped_too_long']} dropped)"),
        ("LoRA", f"r {lora['r']}, alpha {lora['alpha']} on {', '.join(lora['targets'])}"),
        (
            "trainable parameters",
            f"{budget['trainable_params']:,} (weaver: {budget['weaver_trainable_params']:,})",
        ),
        ("steps / epochs", f"{s['steps']} / {s['epochs']}"),
        ("final loss", f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"),
        ("samples/s", f"{s['samples_per_s']:.2f}" if s["samples_per_s"] else "-"),
        ("wall time", f"{s['wall_s']:.0f} s on {s['world_size']} process(es)"),
    ]
    rows += [(f"held-out loss ({k})", f"{v:.4f}") for k, v in s["heldout_loss"].items()]
    for key, value in rows:
        table.add_row(key, value)
    return table
