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
of G), gradients are averaged, and rank 0 writes the artifact. What every training stage
shares (config, output guard, resume, Ctrl-C, summary fields, artifact) is ``stages/frame.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Unpack

import torch
from rich.table import Table
from transformers import TrainingArguments

from memgen_cli.artifacts import load_artifact, read_manifest, require_kind, save_artifact
from memgen_cli.config import GRPOConfig, MemoryConfig, from_dict, to_dict
from memgen_cli.data import EnvironmentTask
from memgen_cli.data.episode_rewards import won
from memgen_cli.errors import MemgenError, require_choice
from memgen_cli.generation import EpisodeConfig, GenerationConfig
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages import frame
from memgen_cli.stages.frame import TrainingInterrupted as TrainingInterrupted
from memgen_cli.stages.frame import checkpoint_dir as checkpoint_dir
from memgen_cli.training import episode_data, episode_grpo, rl, sft_run
from memgen_cli.training.episode_rollouts import episode_logprobs
from memgen_cli.training.grpo import GRPOSettings, GRPOTrainer, PolicyObjective
from memgen_cli.training.grpo_parts import GRPOProgress
from memgen_cli.training.rollouts import policy_logprobs, rollout

MEMORY = ("weaver", "full")


# ----------------------------------------------------------------------------- config
def resolve_config(recipe=None, overrides=None, **flags) -> GRPOConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win): ``base``,
    ``data``, ``task_options``, ``init``, ``rewards``, ``reward_weights``, ``output``,
    ``report_to``."""
    return frame.resolve_config(GRPOConfig, recipe, overrides, **flags)


def validate(cfg: GRPOConfig, resume: str | None) -> Path | None:
    """Check values the dataclass types cannot; return the checkpoint to resume from."""
    t, d, r = cfg.training, cfg.data, cfg.reward
    rl.check_settings(t, r)
    require_choice("training.memory", t.memory, MEMORY)
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
    return frame.resume_point(cfg, resume, settings)


# ------------------------------------------------------------------------------- data
def training_args(cfg: GRPOConfig, ckpts: Path, device: torch.device) -> TrainingArguments:
    t = cfg.training
    return TrainingArguments(
        **{
            **sft_run.trainer_arguments(t, ckpts, device),
            "per_device_train_batch_size": t.batch_size // t.num_generations,  # prompts
        },
        remove_unused_columns=False,
        ddp_find_unused_parameters=True,  # no insertion in a batch: inference queries unused
        ddp_broadcast_buffers=False,
    )


def collate_indices(items: list[dict]) -> dict:
    return {"index": torch.tensor([it["index"] for it in items])}


def heldout_accuracy(model, examples, reward, settings: GRPOSettings, memory) -> float:
    """Greedy accuracy (the task's grader) on held-out problems, as ``memgen eval`` scores."""
    cfg = GenerationConfig(max_new_tokens=settings.max_completion_length, memory=memory)

    def answer(msgs: list) -> list[str]:
        roll = rollout(model, msgs, cfg, 1)
        return model.tokenizer.batch_decode(roll.texts_ids, skip_special_tokens=True)

    return frame.heldout_accuracy(examples, reward, settings, answer)


def rollout_kind(cfg: GRPOConfig, task, model, held, accuracy, settings: GRPOSettings):
    """What prompts and games (``EnvironmentTask``s) do differently: the trainer class and its
    own arguments, the policy's scorer, and ``score(memory)``: greedy held-out accuracy (of
    games: the success rate of their episodes, as ``memgen eval`` plays them)."""
    if not isinstance(task, EnvironmentTask):

        def score(memory: str) -> float:
            return heldout_accuracy(model, held, accuracy, settings, memory)

        return GRPOTrainer, {}, policy_logprobs, score
    # The trained memory's keep_latents (the --init artifact's): playing and scoring agree.
    episode = EpisodeConfig(task.max_turns, cfg.memory.keep_latents)

    def play_score(memory: str) -> float:
        length, system = settings.max_completion_length, settings.system
        return episode_grpo.success_rate(model, task, held, length, memory, episode, system)

    trainer = episode_grpo.EpisodeGRPOTrainer
    return trainer, {"task": task, "episode": episode}, episode_logprobs, play_score


# ------------------------------------------------------------------------------- run
def run(cfg: GRPOConfig, resume: str | None = None, **options: Unpack[frame.RunOptions]) -> Path:
    """Train the weaver with GRPO and write the artifact to ``cfg.output``; returns its path."""
    # 1. validate
    run = frame.Run.start("grpo-weaver", cfg, resume, validate(cfg, resume), **options)
    task, train, held, data_seed = episode_data.load_examples(cfg)  # games checked
    games = isinstance(task, EnvironmentTask)  # rollouts are episodes (docs/agents.md)

    # 2. build
    t, d = cfg.training, cfg.data
    base = run.load_base()
    if cfg.init is not None:
        model, manifest, base = load_artifact(cfg.init, base)
        # What is trained, checkpointed and recorded is the artifact's memory.
        run.cfg = cfg = dataclasses.replace(cfg, memory=from_dict(MemoryConfig, manifest["memory"]))
        run.warn_prompt_suffix(manifest, cfg.init)
    else:
        model = MemGenModel(base.model, base.tokenizer, cfg.memory)
    model.set_trainable(weaver=True, trigger=False)
    accuracy = won if games else rl.task_reward(task)
    funcs, weights = frame.reward_functions(accuracy, cfg.reward)
    settings = GRPOSettings(
        **sft_run.grpo_arguments(t),
        epsilon_high=t.epsilon if t.epsilon_high is None else t.epsilon_high,
        memory=t.memory,
        seed=t.seed,
        log_completions_steps=t.log_completions_steps,
        prompt_suffix=d.prompt_suffix,
        system=d.system or (task.system if games else None),
    )
    args = training_args(cfg, run.ckpts, model.device)
    what = "games" if games else "prompts"
    run.header(
        f"{len(train)} {what} from {task.name}, G={t.num_generations}, "
        f"{t.batch_size // t.num_generations} {what} per micro-batch, rewards "
        f"{', '.join(rl.reward_name(f) for f in funcs)}, "
        + (f"from {cfg.init}" if cfg.init else "fresh weaver")
    )
    trainer_class, kind, scorer, score = rollout_kind(cfg, task, model, held, accuracy, settings)
    acc: dict[str, float] = {}
    if held and run.main and run.resume_from is None:
        acc["weaver_initial"] = score("weaver")
    acc = run.begin(acc)  # a resumed run reads back what its fresh start measured
    trainer = trainer_class(
        **kind,
        policy=model,
        examples=train,
        reward_funcs=funcs,
        reward_weights=weights,
        settings=settings,
        completions_dir=run.ckpts / "completions",
        console=run.console,
        model=PolicyObjective(model, scorer),
        args=args,
        train_dataset=[{"index": i} for i in range(len(train))],
        data_collator=collate_indices,
        callbacks=run.callbacks(GRPOProgress, args),
    )

    # 3. loop
    run.fit(trainer)

    # 4. save (main process; the others wait so that the run ends together)
    if run.main:
        if held:
            acc["weaver_final"] = score("weaver")
            acc["memory_off"] = score("off")
        summary = {
            "stage": "grpo-weaver",
            **run.data_fields(task, data_seed),
            "prompts": len(train),
            **({"episodes": dataclasses.asdict(kind["episode"])} if games else {}),
            "heldout_samples": len(held),
            "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()},
            **frame.grpo_fields(funcs, weights, t),
            **frame.first_and_final(trainer.state.log_history, "reward"),
            **run.trainer_fields(trainer),
        }
        out = run.save(save_artifact, model, base, summary, parent=cfg.init)
        run.console.print(summary_table(summary, out))
    return run.end(trainer)


def summary_table(s: dict, out: Path) -> Table:
    rows = [
        ("task", f"{s['task']} ({s['prompts']} prompts, G={s['num_generations']})"),
        *frame.trainer_rows(s, frame.first_and_final_row(s, "reward")),
        *frame.score_rows("held-out accuracy", s["heldout_accuracy"], 3),
    ]
    return frame.table(f"grpo-weaver → {out}", rows)
