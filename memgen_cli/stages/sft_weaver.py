"""``memgen sft-weaver``: train the memory weaver by supervised fine-tuning (paper Appendix B.1).

The loss is the frozen reasoner's cross-entropy on the reference solution, with latents woven
at the prompt boundary and at delimiters of the solution; gradients reach only the weaver (its
LoRA, query latents, norms, scales and both projections). Reads top to bottom:

1. validate: the config, the resume point, the task and its data (bad data fails here, before
   any model is loaded);
2. build: base model + MemGen composition, tokenised samples (too long ones dropped and
   counted), the collator with the insertion schedule, a transformers ``Trainer``;
3. loop: ``Trainer.train`` owns optimizer, scheduler, accumulation, mixed precision,
   checkpoints, ``--resume``, ``--report-to`` and multi-process training (``torchrun``); our
   callbacks draw the progress line, write ``metrics.jsonl`` and turn Ctrl-C into a checkpoint;
4. save: the main process writes the artifact atomically; the other processes wait.

Checkpoints (``<output>.checkpoints/checkpoint-N/``) are the Trainer's own: ``model.safetensors``
holds only the weaver's tensors (``trainer_parts.WeaverObjective.state_dict``), next to the optimizer,
scheduler and RNG states that resuming needs. They exist while a run is unfinished and are
removed once its artifact is written. Beside them, ``recipe.yaml`` and ``run.json`` hold what
``--resume`` compares (only ``sft_run.RESUMABLE`` settings may change) and reads back (the
held-out loss before training), so a resumed run's artifact says what an uninterrupted one's does.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from memgen_cli.artifacts import check_output, save_artifact
from memgen_cli.config import SFTConfig, dump_yaml, load_recipe, to_dict
from memgen_cli.console import make_console
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training.sft_data import SCHEDULES, SFTCollator, encode_examples, heldout_loss
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
    SetEpoch,
    StopOnSignal,
    Throughput,
    WeaverObjective,
    world_size,
)


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
) -> SFTConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win)."""
    cfg = load_recipe(SFTConfig, recipe, overrides)
    d = data_config(cfg.data, data, columns, task_options)
    model = cfg.model if base is None else dataclasses.replace(cfg.model, base=base)
    t = (
        cfg.training
        if report_to is None
        else dataclasses.replace(cfg.training, report_to=report_to)
    )
    return dataclasses.replace(
        cfg, model=model, data=d, training=t, output=str(output) if output else cfg.output
    )


def checkpoint_dir(cfg: SFTConfig) -> Path:
    out = Path(cfg.output)
    return out.with_name(out.name + ".checkpoints")


def validate(cfg: SFTConfig, resume: str | None) -> Path | None:
    """Check values the dataclass types cannot; return the checkpoint to resume from."""
    if cfg.training.schedule not in SCHEDULES:
        raise MemgenError(
            f'training.schedule must be one of {", ".join(SCHEDULES)}; got "{cfg.training.schedule}".'
        )
    validate_training(cfg.training, cfg.data)
    validate_memory(cfg.memory)
    return resume_point(checkpoint_dir(cfg), resume, to_dict(cfg))


# ----------------------------------------------------------------------------- trainer
def training_args(cfg: SFTConfig, ckpts: Path, device: torch.device) -> TrainingArguments:
    return TrainingArguments(
        **trainer_arguments(cfg.training, ckpts, device),
        remove_unused_columns=False,  # the collator's points are not model "columns"
        # Inference queries get no gradient in a batch without delimiters; buffers (the
        # delimiter table) are constant, so there is nothing to broadcast.
        ddp_find_unused_parameters=True,
        ddp_broadcast_buffers=False,
    )


def run(
    cfg: SFTConfig,
    resume: str | None = None,
    console: Console | None = None,
    callbacks: list | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the weaver and write the artifact to ``cfg.output``; returns its path.

    ``overwrite``: replace an artifact already at ``cfg.output`` (a ``resume`` consents too);
    anything else there is refused before any model is loaded (``check_output``).
    """
    console = console or make_console()
    # 1. validate
    resume_from = validate(cfg, resume)
    check_output(cfg.output, kind="artifact", overwrite=overwrite or resume is not None)
    task, train_examples, held_examples, data_seed = load_examples(cfg)

    # 2. build
    set_seed(cfg.training.seed)
    base = load_base(cfg.model.base, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    model = MemGenModel(base.model, base.tokenizer, cfg.memory)
    model.set_trainable(weaver=True, trigger=False)
    d, t = cfg.data, cfg.training
    train, dropped = encode_examples(model, train_examples, d.prompt_suffix, d.system, d.max_length)
    held, held_dropped = encode_examples(
        model, held_examples, d.prompt_suffix, d.system, d.max_length
    )
    if not train:
        raise MemgenError(
            f"All {dropped} training samples are longer than data.max_length={d.max_length} "
            "tokens; raise it with --set data.max_length=N."
        )
    cap = cfg.memory.max_inference_insertions
    pad = base.tokenizer.pad_token_id
    collate = SFTCollator(pad, t.schedule, cap, t.prompt_insertion, t.seed)
    # Held-out points follow what generation does: the first `cap` delimiters.
    held_collate = SFTCollator(pad, "first", cap, t.prompt_insertion, t.seed)
    off_collate = SFTCollator(pad, memory=False)
    ckpts = checkpoint_dir(cfg)
    args = training_args(cfg, ckpts, model.device)
    main = args.process_index == 0
    say = console.print if main else (lambda *a, **k: None)
    say(
        f"sft-weaver: {len(train)} samples from {task.name} ({dropped} dropped as longer than "
        f"{d.max_length} tokens), schedule {t.schedule}, {world_size()} process(es)"
        + (f", resuming from {resume_from}" if resume_from else "")
    )
    if resume == "auto" and resume_from is None:
        say(f"--resume auto: no checkpoint in {ckpts}, starting from scratch")
    losses: dict[str, float] = {}
    if held and main and resume_from is None:
        losses["weaver_initial"] = heldout_loss(model, held, held_collate, t.batch_size)
    if main:  # a resumed run reads back what its fresh start measured
        losses = begin_checkpoints(ckpts, cfg, resume_from, losses)
    objective = WeaverObjective(model)
    clock = Throughput(t.batch_size * t.grad_accumulation * args.world_size)
    stop = StopOnSignal()
    trainer = Trainer(
        model=objective,
        args=args,
        train_dataset=[dataclasses.asdict(e) for e in train],  # dicts: the sampler reads input_ids
        data_collator=collate,
        callbacks=[
            RichProgress(clock, console),
            MetricsLog(ckpts / "metrics.jsonl", clock),
            stop,
            ResumedIntervals(),
            SetEpoch(collate),
            *(callbacks or []),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress replaces the raw dict printer

    # 3. loop
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started
    if stop.stopped_at is not None:
        raise TrainingInterrupted(ckpts / f"checkpoint-{stop.stopped_at}")

    # 4. save (main process; the others wait so that the run ends together)
    per_rank = _gather(objective.samples_seen)
    if main:
        if held:
            losses["memory_off"] = heldout_loss(model, held, off_collate, t.batch_size)
            losses["weaver_final"] = heldout_loss(model, held, held_collate, t.batch_size)
        logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        summary = {
            "stage": "sft-weaver",
            "task": task.name,
            "task_options": dict(d.options),
            "data": d.path or d.task,
            "split": d.split,
            "data_seed": data_seed,
            "eval_seed": task.eval_seed,
            "training_seed": t.seed,
            "samples": len(train),
            "dropped_too_long": dropped,
            "heldout_samples": len(held),
            "heldout_dropped_too_long": held_dropped,
            "heldout_loss": {k: round(v, 5) for k, v in losses.items()},
            "schedule": t.schedule,
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 4),
            "final_loss": logged[-1] if logged else None,
            "mean_loss": mean_loss(trainer.state.log_history),
            "samples_per_s": clock.rate(trainer.state.global_step),
            "wall_s": round(wall, 1),
            "world_size": args.world_size,
            "samples_per_rank": per_rank,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        out = save_artifact(
            model,
            base,
            cfg.output,
            prompt={"prompt_suffix": d.prompt_suffix, "system": d.system},
            recipe_yaml=dump_yaml(cfg),
            training=summary,
            metrics_file=ckpts / "metrics.jsonl",
        )
        shutil.rmtree(ckpts, ignore_errors=True)  # the run is finished: nothing to resume
        console.print(summary_table(summary, out))
    trainer.accelerator.wait_for_everyone()
    return Path(cfg.output)


def _gather(value: int) -> list[int]:
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def summary_table(s: dict, out: Path) -> Table:
    table = Table(title=f"sft-weaver → {out}", show_header=False)
    rows = [
        ("task", f"{s['task']} ({s['samples']} samples, {s['dropped_too_long']} dropped)"),
        ("steps / epochs", f"{s['steps']} / {s['epochs']}"),
        ("final loss", f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"),
        ("samples/s", f"{s['samples_per_s']:.2f}" if s["samples_per_s"] else "-"),
        ("wall time", f"{s['wall_s']:.0f} s on {s['world_size']} process(es)"),
    ]
    rows += [(f"held-out loss ({k})", f"{v:.4f}") for k, v in s["heldout_loss"].items()]
    for key, value in rows:
        table.add_row(key, value)
    return table
