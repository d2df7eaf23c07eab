"""`memgen grpo-weaver`: train the memory weaver with GRPO on verifiable rewards.

Reads top to bottom: validate (config values, batch divisible by G, reward plug-ins, --init
artifact, resume point) -> build (base + weaver, fresh or from --init; prompts; rewards; the
Trainer) -> loop (``training/grpo.py``: rollouts with woven latents, rewards, group advantages,
the clipped loss through the batched training forward) -> save (atomic artifact whose manifest
names the --init artifact as its parent, with ``metrics.jsonl`` and ``completions/``).

Checkpoints go to ``<output>.checkpoints/`` (weaver tensors, optimizer, scheduler, RNG) while
a run is unfinished; Ctrl-C writes one and ``--resume auto`` continues (rollouts are
regenerated, never restored; the same settings, but for ``sft_run.RESUMABLE`` ones, and with
--init the artifact's memory). With torchrun each process answers its own prompts (whole groups
of G), gradients are averaged, and rank 0 writes the artifact.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import PrinterCallback, TrainingArguments, set_seed

from memgen_cli.artifacts import (
    check_output,
    load_artifact,
    read_manifest,
    require_kind,
    save_artifact,
)
from memgen_cli.config import GRPOConfig, MemoryConfig, dump_yaml, from_dict, load_recipe, to_dict
from memgen_cli.console import make_console
from memgen_cli.data import to_messages
from memgen_cli.errors import MemgenError
from memgen_cli.generation import GenerationConfig
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training import rl, sft_run
from memgen_cli.training.grpo import GRPOProgress, GRPOSettings, GRPOTrainer, PolicyObjective
from memgen_cli.training.rollouts import rollout
from memgen_cli.training.trainer_parts import MetricsLog, StopOnSignal, Throughput, world_size

MEMORY = ("weaver", "full")


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
    task_options: dict | None = None,
    init: str | Path | None = None,
    rewards: list[str] | None = None,
    reward_weights: list[float] | None = None,
    output: str | Path | None = None,
    report_to: str | None = None,
) -> GRPOConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win)."""
    cfg = load_recipe(GRPOConfig, recipe, overrides)
    d = sft_run.data_config(cfg.data, data, None, task_options)
    r = cfg.reward
    if rewards:
        r = dataclasses.replace(r, functions=[*r.functions, *rewards])
    if reward_weights:
        r = dataclasses.replace(r, weights=[*r.weights, *map(float, reward_weights)])
    t = cfg.training
    if report_to is not None:
        t = dataclasses.replace(t, report_to=report_to)
    return dataclasses.replace(
        cfg,
        model=cfg.model if base is None else dataclasses.replace(cfg.model, base=base),
        data=d,
        training=t,
        reward=r,
        init=str(init) if init is not None else cfg.init,
        output=str(output) if output else cfg.output,
    )


def checkpoint_dir(cfg: GRPOConfig) -> Path:
    out = Path(cfg.output)
    return out.with_name(out.name + ".checkpoints")


def validate(cfg: GRPOConfig, resume: str | None) -> Path | None:
    """Check values the dataclass types cannot; return the checkpoint to resume from."""
    t, d, r = cfg.training, cfg.data, cfg.reward
    rl.check_settings(t, r)
    if t.memory not in MEMORY:
        raise MemgenError(f'training.memory must be one of {", ".join(MEMORY)}; got "{t.memory}".')
    sft_run.validate_training(t, d)  # schedule, reporters, steps, data sizes
    if cfg.init is not None:
        manifest = read_manifest(cfg.init)
        require_kind(manifest, cfg.init, "weaver")  # now, not after the base has loaded
        if t.memory == "full" and not manifest["trigger"].get("trained"):
            raise MemgenError(
                f"training.memory full needs a trained trigger, and {cfg.init} has none; "
                "use training.memory=weaver."
            )
    elif t.memory == "full":
        raise MemgenError("training.memory full needs --init with a trained trigger.")
    else:
        sft_run.validate_memory(cfg.memory)  # with --init the artifact's memory applies
    settings = to_dict(cfg)
    if cfg.init is not None:  # run() trains the artifact's memory settings, not the recipe's
        settings["memory"] = to_dict(from_dict(MemoryConfig, manifest["memory"]))
    return sft_run.resume_point(checkpoint_dir(cfg), resume, settings)


# ------------------------------------------------------------------------------- data
def training_args(cfg: GRPOConfig, ckpts: Path, device: torch.device) -> TrainingArguments:
    t = cfg.training
    reporters = [r.strip() for r in t.report_to.split(",") if r.strip() != "none"]
    return TrainingArguments(
        output_dir=str(ckpts),
        per_device_train_batch_size=t.batch_size // t.num_generations,  # prompts
        gradient_accumulation_steps=t.grad_accumulation,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        bf16=t.bf16,
        report_to=reporters or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        ddp_find_unused_parameters=True,  # no insertion in a batch: inference queries unused
        ddp_broadcast_buffers=False,
        log_level="passive",
    )


def collate_indices(items: list[dict]) -> dict:
    return {"index": torch.tensor([it["index"] for it in items])}


def heldout_accuracy(model, examples, reward, settings: GRPOSettings, memory, batch=8) -> float:
    """Greedy accuracy (the task's grader) on held-out problems, as ``memgen eval`` scores."""
    cfg = GenerationConfig(max_new_tokens=settings.max_completion_length, memory=memory)
    hits = []
    for i in range(0, len(examples), batch):
        part = examples[i : i + batch]
        msgs = [to_messages(e, settings.prompt_suffix, settings.system) for e in part]
        roll = rollout(model, msgs, cfg, 1)
        text = model.tokenizer.batch_decode(roll.texts_ids, skip_special_tokens=True)
        hits += reward(prompts=msgs, completions=text, **rl.example_columns(part))
    return sum(hits) / max(len(hits), 1)


# ------------------------------------------------------------------------------- run
def run(
    cfg: GRPOConfig,
    resume: str | None = None,
    console: Console | None = None,
    callbacks: list | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the weaver with GRPO and write the artifact to ``cfg.output``; returns its path.

    ``overwrite``: replace an artifact already at ``cfg.output`` (a ``resume`` consents too);
    anything else there is refused before any model is loaded (``check_output``).
    """
    console = console or make_console()
    # 1. validate
    resume_from = validate(cfg, resume)
    check_output(cfg.output, kind="artifact", overwrite=overwrite or resume is not None)
    task, train, held, data_seed = sft_run.load_examples(cfg)
    plugins = [rl.load_reward(spec) for spec in cfg.reward.functions]

    # 2. build
    t, d = cfg.training, cfg.data
    set_seed(t.seed)
    base = load_base(cfg.model.base, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    if cfg.init is not None:
        model, manifest, base = load_artifact(cfg.init, base)
        cfg = dataclasses.replace(cfg, memory=from_dict(MemoryConfig, manifest["memory"]))
        recorded = manifest.get("prompt", {}).get("prompt_suffix")
        if recorded is not None and recorded != d.prompt_suffix:
            console.print(
                f"[yellow]warning:[/] data.prompt_suffix {d.prompt_suffix!r} differs from the one "
                f"{cfg.init} was trained with ({recorded!r})."
            )
    else:
        model = MemGenModel(base.model, base.tokenizer, cfg.memory)
    model.set_trainable(weaver=True, trigger=False)
    accuracy = rl.task_reward(task)
    funcs = ([accuracy] if cfg.reward.task_weight > 0 else []) + plugins
    weights = ([cfg.reward.task_weight] if cfg.reward.task_weight > 0 else []) + (
        cfg.reward.weights or [1.0] * len(plugins)
    )
    settings = GRPOSettings(
        num_generations=t.num_generations,
        temperature=t.temperature,
        top_p=t.top_p,
        max_completion_length=t.max_completion_length,
        memory=t.memory,
        loss_type=t.loss_type,
        scale_rewards=t.scale_rewards,
        beta=t.beta,
        epsilon=t.epsilon,
        epsilon_high=t.epsilon if t.epsilon_high is None else t.epsilon_high,
        num_iterations=t.num_iterations,
        mask_truncated_completions=t.mask_truncated_completions,
        disable_dropout=t.disable_dropout,
        seed=t.seed,
        log_completions_steps=t.log_completions_steps,
        prompt_suffix=d.prompt_suffix,
        system=d.system,
    )
    ckpts = checkpoint_dir(cfg)
    args = training_args(cfg, ckpts, model.device)
    main = args.process_index == 0
    say = console.print if main else (lambda *a, **k: None)
    say(
        f"grpo-weaver: {len(train)} prompts from {task.name}, G={t.num_generations}, "
        f"{t.batch_size // t.num_generations} prompts per micro-batch, rewards "
        f"{', '.join(rl.reward_name(f) for f in funcs)}, "
        + (f"from {cfg.init}" if cfg.init else "fresh weaver")
        + f", {world_size()} process(es)"
        + (f", resuming from {resume_from}" if resume_from else "")
    )
    if resume == "auto" and resume_from is None:
        say(f"--resume auto: no checkpoint in {ckpts}, starting from scratch")
    acc: dict[str, float] = {}
    if held and main and resume_from is None:
        acc["weaver_initial"] = heldout_accuracy(model, held, accuracy, settings, "weaver")
    if main:  # a resumed run reads back what its fresh start measured
        acc = sft_run.begin_checkpoints(ckpts, cfg, resume_from, acc)
    clock = Throughput(t.batch_size * t.grad_accumulation * args.world_size)
    stop = StopOnSignal()
    trainer = GRPOTrainer(
        policy=model,
        examples=train,
        reward_funcs=funcs,
        reward_weights=weights,
        settings=settings,
        completions_dir=ckpts / "completions",
        console=console,
        model=PolicyObjective(model),
        args=args,
        train_dataset=[{"index": i} for i in range(len(train))],
        data_collator=collate_indices,
        callbacks=[
            GRPOProgress(clock, console),
            MetricsLog(ckpts / "metrics.jsonl", clock),
            stop,
            sft_run.ResumedIntervals(),
            *(callbacks or []),
        ],
    )
    trainer.remove_callback(PrinterCallback)

    # 3. loop
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except MemgenError:  # e.g. a reward function failed: leave nothing half-written
        if main and resume_from is None and not list(ckpts.glob("checkpoint-*")):
            shutil.rmtree(ckpts, ignore_errors=True)
        raise
    wall = time.perf_counter() - started
    if stop.stopped_at is not None:
        raise TrainingInterrupted(ckpts / f"checkpoint-{stop.stopped_at}")

    # 4. save (main process; the others wait so that the run ends together)
    if main:
        if held:
            acc["weaver_final"] = heldout_accuracy(model, held, accuracy, settings, "weaver")
            acc["memory_off"] = heldout_accuracy(model, held, accuracy, settings, "off")
        logged = [r for r in trainer.state.log_history if "reward" in r]
        summary = {
            "stage": "grpo-weaver",
            "task": task.name,
            "data": d.path or d.task,
            "split": d.split,
            "task_options": dict(d.options),
            "data_seed": data_seed,
            "eval_seed": task.eval_seed,
            "training_seed": t.seed,
            "prompts": len(train),
            "heldout_samples": len(held),
            "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()},
            "rewards": [rl.reward_name(f) for f in funcs],
            "reward_weights": weights,
            "num_generations": t.num_generations,
            "loss_type": t.loss_type,
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 4),
            "first_reward": logged[0]["reward"] if logged else None,
            "final_reward": logged[-1]["reward"] if logged else None,
            "samples_per_s": clock.rate(trainer.state.global_step),
            "wall_s": round(wall, 1),
            "world_size": args.world_size,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        out = save_artifact(
            model,
            base,
            cfg.output,
            prompt={"prompt_suffix": d.prompt_suffix, "system": d.system},
            recipe_yaml=dump_yaml(cfg),
            training=summary,
            parent=cfg.init,
            metrics_file=ckpts / "metrics.jsonl",
        )
        # The completions log joins the finished artifact (the artifact is whole without it).
        if (ckpts / "completions").is_dir():
            os.replace(ckpts / "completions", out / "completions")
        shutil.rmtree(ckpts, ignore_errors=True)
        console.print(summary_table(summary, out))
    trainer.accelerator.wait_for_everyone()
    return Path(cfg.output)


def summary_table(s: dict, out: Path) -> Table:
    table = Table(title=f"grpo-weaver → {out}", show_header=False)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [
        ("task", f"{s['task']} ({s['prompts']} prompts, G={s['num_generations']})"),
        ("steps / epochs", f"{s['steps']} / {s['epochs']}"),
        ("reward first → final", f"{fmt(s['first_reward'])} → {fmt(s['final_reward'])}"),
        ("samples/s", f"{s['samples_per_s']:.2f}" if s["samples_per_s"] else "-"),
        ("wall time", f"{s['wall_s']:.0f} s on {s['world_size']} process(es)"),
    ]
    rows += [(f"held-out accuracy ({k})", f"{v:.3f}") for k, v in s["heldout_accuracy"].items()]
    for key, value in rows:
        table.add_row(key, value)
    return table
