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

What every training stage shares (config resolution, the output guard, resume, Ctrl-C, the
header and summary fields, the artifact and its checkpoints) is ``stages/frame.py``.

Checkpoints (``<output>.checkpoints/checkpoint-N/``) are the Trainer's own: ``model.safetensors``
holds only the weaver's tensors (``trainer_parts.WeaverObjective.state_dict``), next to the optimizer,
scheduler and RNG states that resuming needs. They exist while a run is unfinished and are
removed once its artifact is written. Beside them, ``recipe.yaml`` and ``run.json`` hold what
``--resume`` compares (only ``sft_run.RESUMABLE`` settings may change) and reads back (the
held-out loss before training), so a resumed run's artifact says what an uninterrupted one's does.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Unpack

import torch
import torch.distributed as dist
from rich.table import Table
from transformers import Trainer, TrainingArguments

from memgen_cli.artifacts import save_artifact
from memgen_cli.config import SFTConfig
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.errors import require_choice
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages import frame
from memgen_cli.stages.frame import TrainingInterrupted as TrainingInterrupted
from memgen_cli.stages.frame import checkpoint_dir as checkpoint_dir
from memgen_cli.training.episode_data import (
    EpisodeCollator,
    check_episode_data,
    encode_episodes,
)
from memgen_cli.training.sft_data import (
    SCHEDULES,
    SFTCollator,
    encode_examples,
    encode_splits,
    heldout_loss,
)
from memgen_cli.training.sft_run import (
    load_examples,
    trainer_arguments,
    validate_memory,
    validate_training,
)
from memgen_cli.training.trainer_parts import (
    RichProgress,
    SetEpoch,
    WeaverObjective,
    world_size,
)


# ----------------------------------------------------------------------------- config
def resolve_config(recipe=None, overrides=None, **flags) -> SFTConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win): ``base``,
    ``data``, ``columns``, ``task_options``, ``output``, ``report_to``."""
    return frame.resolve_config(SFTConfig, recipe, overrides, **flags)


def validate(cfg: SFTConfig, resume: str | None) -> Path | None:
    """Check values the dataclass types cannot; return the checkpoint to resume from."""
    require_choice("training.schedule", cfg.training.schedule, SCHEDULES)
    validate_training(cfg.training, cfg.data)
    validate_memory(cfg.memory)
    return frame.resume_point(cfg, resume)


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


def run(cfg: SFTConfig, resume: str | None = None, **options: Unpack[frame.RunOptions]) -> Path:
    """Train the weaver and write the artifact to ``cfg.output``; returns its path."""
    # 1. validate
    run = frame.Run.start("sft-weaver", cfg, resume, validate(cfg, resume), **options)
    task, train_examples, held_examples, data_seed = load_examples(cfg)
    encode, collator = encode_examples, SFTCollator
    if isinstance(task, EnvironmentTask):  # expert episodes (training/episode_data.py)
        check_episode_data(task, cfg.data, len(train_examples) + len(held_examples))
        encode = functools.partial(encode_episodes, task=task)
        collator = functools.partial(EpisodeCollator, keep_latents=cfg.memory.keep_latents)

    # 2. build
    base = run.load_base()
    model = MemGenModel(base.model, base.tokenizer, cfg.memory)
    model.set_trainable(weaver=True, trigger=False)
    d, t = cfg.data, cfg.training
    train, dropped, held, held_dropped = encode_splits(
        encode, model, train_examples, held_examples, d
    )
    cap = cfg.memory.max_inference_insertions
    pad = base.tokenizer.pad_token_id
    collate = collator(pad, t.schedule, cap, t.prompt_insertion, t.seed)
    # Held-out points follow what generation does: the first `cap` delimiters.
    held_collate = collator(pad, "first", cap, t.prompt_insertion, t.seed)
    off_collate = collator(pad, memory=False)
    args = training_args(cfg, run.ckpts, model.device)
    run.header(
        f"{len(train)} samples from {task.name} ({dropped} dropped as longer than "
        f"{d.max_length} tokens), schedule {t.schedule}"
    )
    losses: dict[str, float] = {}
    if held and run.main and run.resume_from is None:
        losses["weaver_initial"] = heldout_loss(model, held, held_collate, t.batch_size)
    losses = run.begin(losses)  # a resumed run reads back what its fresh start measured
    objective = WeaverObjective(model)
    trainer = Trainer(
        model=objective,
        args=args,
        train_dataset=[dataclasses.asdict(e) for e in train],  # dicts: the sampler reads input_ids
        data_collator=collate,
        callbacks=run.callbacks(RichProgress, args, SetEpoch(collate)),
    )

    # 3. loop
    run.fit(trainer)

    # 4. save (main process; the others wait so that the run ends together)
    per_rank = _gather(objective.samples_seen)
    if run.main:
        if held:
            losses["memory_off"] = heldout_loss(model, held, off_collate, t.batch_size)
            losses["weaver_final"] = heldout_loss(model, held, held_collate, t.batch_size)
        summary = {
            "stage": "sft-weaver",
            **run.data_fields(task, data_seed),
            "samples": len(train),
            "dropped_too_long": dropped,
            "heldout_samples": len(held),
            "heldout_dropped_too_long": held_dropped,
            "heldout_loss": {k: round(v, 5) for k, v in losses.items()},
            "schedule": t.schedule,
            **frame.loss_fields(trainer.state.log_history),
            **run.trainer_fields(trainer),
            "samples_per_rank": per_rank,
        }
        out = run.save(save_artifact, model, base, summary)
        run.console.print(summary_table(summary, out))
    return run.end(trainer)


def _gather(value: int) -> list[int]:
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def summary_table(s: dict, out: Path) -> Table:
    rows = [
        ("task", f"{s['task']} ({s['samples']} samples, {s['dropped_too_long']} dropped)"),
        *frame.trainer_rows(s, frame.loss_row(s)),
        *frame.score_rows("held-out loss", s["heldout_loss"], 4),
    ]
    return frame.table(f"sft-weaver → {out}", rows)
