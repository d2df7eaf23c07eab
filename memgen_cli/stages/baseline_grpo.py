"""``memgen baseline grpo``: LoRA-GRPO of the reasoner itself, the RL comparison for grpo-weaver.

A LoRA adapter on the reasoner (no weaving, a plain PEFT model), trained with TRL's
``GRPOTrainer`` through its public API: for a plain model it is exactly right (RL.md). The
recipe's ``data``, ``training`` and ``reward`` sections are grpo-weaver's, mapped onto
``trl.GRPOConfig`` (G, sampling, loss type, reward scaling, beta, clipping, iterations, steps,
batches, schedule), so both see the same prompts (rendered by ``data.to_messages`` and the
tokenizer's chat template, as ``generate`` and grpo-weaver render them), the same rewards
(the task's grader, ``rl.task_reward``, plus ``--reward`` plug-ins with their weights) and the
same budget of completions. The rank is matched to the weaver's trainable parameters when
``lora.r`` is null; ``init`` starts from a LoRA ``baseline sft`` artifact, as grpo-weaver starts
from an SFT weaver (prompt and prefix tuning ones are refused: TRL samples rollouts through
PEFT's generate, which does not run them right; see models/prompt_learning.py). Reads top to
bottom:

1. validate: config values (``rl.check_settings``: G, batch divisible by G, ...), the reward
   plug-ins, the ``init`` artifact, the resume point, the task and its prompts;
2. build: the base model (with ``init``'s adapter, trainable), the prompts as a dataset with an
   ``index`` column that maps each completion back to its example's columns
   (``rl.example_columns``), TRL's ``GRPOTrainer`` with our progress, metrics and Ctrl-C
   callbacks;
3. loop: ``GRPOTrainer.train`` (rollouts, rewards, advantages, loss, checkpoints, ``--resume``);
4. save: the main process writes the baseline artifact atomically (the same kind as
   ``baseline sft``'s, so ``memgen eval --artifact`` scores it the same way), with ``init`` as
   its parent.

On a ``textworld:<challenge>`` task a rollout is an episode: TRL's ``rollout_func`` plays the
games through memgen's engine and masks the environment's tokens out of the loss
(``training/lora_episodes.py``); the task reward is ``won``, held-out accuracy the success rate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Unpack

import datasets
import torch
import trl
from rich.table import Table

from memgen_cli.artifacts import (
    BASELINE_NAMES,
    load_baseline,
    read_manifest,
    require_kind,
    save_baseline,
)
from memgen_cli.config import BaselineGRPOConfig
from memgen_cli.data import EnvironmentTask, Example, to_messages
from memgen_cli.data.episode_rewards import won
from memgen_cli.errors import MemgenError
from memgen_cli.generation import EpisodeConfig, encode_prompts
from memgen_cli.stages import frame
from memgen_cli.stages.baseline import (
    WEAVER_ONLY,
    beside_weaver,
    budget_text,
    lora_rows,
    lora_settings,
    measure_budget,
    validate_lora,
    weaver_trainable_params,
)
from memgen_cli.stages.frame import TrainingInterrupted as TrainingInterrupted
from memgen_cli.stages.frame import checkpoint_dir as checkpoint_dir
from memgen_cli.training import episode_data, rl, sft_run
from memgen_cli.training.grpo_parts import GRPOProgress
from memgen_cli.training.lora_episodes import EpisodeRollout, on_episodes, player_for


# ----------------------------------------------------------------------------- config
def resolve_config(recipe=None, overrides=None, **flags) -> BaselineGRPOConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win): ``base``,
    ``data``, ``task_options``, ``init``, ``rewards``, ``reward_weights``, ``output``,
    ``report_to``. A grpo-weaver recipe's ``output`` and ``init`` name weavers: the baseline
    reads the baselines beside them (``baseline.beside_weaver``)."""
    cfg = frame.resolve_config(BaselineGRPOConfig, recipe, overrides, **flags)
    return beside_weaver(cfg, recipe, overrides, flags, output="baseline-grpo", init="baseline-sft")


def validate(cfg: BaselineGRPOConfig, resume: str | None) -> tuple[Path | None, dict | None]:
    """Check values the dataclass types cannot; return (the checkpoint to resume from, the
    ``init`` artifact's manifest or None)."""
    validate_lora(cfg.lora)
    rl.check_settings(cfg.training, cfg.reward)
    sft_run.validate_training(cfg.training, cfg.data)
    sft_run.validate_memory(cfg.memory)
    manifest = None
    if cfg.init is not None:
        manifest = read_manifest(cfg.init)
        require_kind(manifest, cfg.init, "baseline")  # a retrieval store: its own message
        if manifest["kind"] != "baseline":
            raise MemgenError(
                f"init {cfg.init} is a {manifest['kind']} artifact (a trained weaver), not a LoRA "
                "baseline: baseline grpo starts from an artifact of `memgen baseline sft` (or "
                f"from a fresh LoRA, init: null). To continue a weaver by GRPO, use "
                f"`memgen grpo-weaver --init {cfg.init}`."
            )
        if manifest["method"] != "lora":
            # TRL samples rollouts with the PEFT model's generate, which for prompt learning
            # disagrees with PEFT's own forward (models/prompt_learning.py): the policy the
            # rollouts came from would not be the one the loss scores.
            raise MemgenError(
                f"init {cfg.init} is a {BASELINE_NAMES[manifest['method']]} baseline; baseline "
                "grpo trains LoRA baselines only. Start from a LoRA baseline (`memgen baseline "
                "sft --method lora`) or from a fresh LoRA (init: null)."
            )
    # With init the artifact's adapter is trained, whatever lora says.
    unread = WEAVER_ONLY + (("lora",) if cfg.init else ())
    return frame.resume_point(cfg, resume, unread=unread), manifest


def check_init_base(cfg: BaselineGRPOConfig, manifest: dict, base) -> None:
    want = manifest["reasoner"]
    if want.get("fingerprint") != base.fingerprint:
        raise MemgenError(
            f'init {cfg.init} was trained on base "{want.get("name")}" (fingerprint '
            f"{str(want.get('fingerprint'))[:12]}), not on {base.name} (fingerprint "
            f"{base.fingerprint[:12]}): pass --base {want.get('name')}, or an init trained on "
            f"{base.name}."
        )


# ---------------------------------------------------------------------------- rewards
def by_index(fn: rl.RewardFn, examples: list[Example]) -> rl.RewardFn:
    """``fn`` as TRL calls it, with the columns grpo-weaver gives rewards: each completion's
    example (``rl.example_columns``, looked up by the dataset's ``index`` column) and
    ``completion_ids``. Goes through ``rl.score``, so a failing or malformed reward stops the
    run with one message naming it."""

    def reward(prompts, completions, index, completion_ids=None, **_):
        columns = rl.example_columns([examples[i] for i in index])
        columns["completion_ids"] = completion_ids
        table, _ = rl.score([fn], [1.0], prompts, completions, columns)
        return [None if math.isnan(v) else v for v in table[:, 0].tolist()]

    reward.__name__ = reward.__qualname__ = rl.reward_name(fn)  # TRL's metric names
    return reward


@torch.no_grad()
def heldout_accuracy(model, tok, examples, reward, cfg: BaselineGRPOConfig) -> float:
    """Greedy accuracy (the task's grader) on held-out problems, as ``memgen eval`` scores a
    baseline (its prompt, greedy answers of at most ``max_completion_length`` tokens)."""
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    eos = model.generation_config.eos_token_id
    eos = sorted({tok.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])})

    def answer(msgs: list) -> list[str]:
        enc = encode_prompts(tok, msgs, device)
        out = model.generate(
            **enc,
            max_new_tokens=cfg.training.max_completion_length,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    accuracy = frame.heldout_accuracy(examples, reward, cfg.data, answer)
    model.train(was_training)
    return accuracy


def episode_rollout(cfg: BaselineGRPOConfig, task, train, base) -> EpisodeRollout:
    """TRL's rollout function for ``task``'s games (``training/lora_episodes.py``)."""
    episode = EpisodeConfig(task.max_turns)  # memory off: no latents to keep or drop
    system = cfg.data.system or task.system
    player = player_for(base.model, base.tokenizer)
    mask = cfg.training.mask_truncated_completions
    return EpisodeRollout(player, task, train, episode, system, mask)


def score(model, tok, held, accuracy, cfg: BaselineGRPOConfig, rollout) -> float:
    """Held-out greedy accuracy; of games, the success rate of the policy's episodes."""
    if rollout is None:
        return heldout_accuracy(model, tok, held, accuracy, cfg)
    return rollout.success_rate(model, held, cfg.training.max_completion_length)


# ------------------------------------------------------------------------------- run
def run(
    cfg: BaselineGRPOConfig, resume: str | None = None, **options: Unpack[frame.RunOptions]
) -> Path:
    """Train the LoRA baseline by GRPO and write the artifact to ``cfg.output``; returns it."""
    # 1. validate
    resume_from, init = validate(cfg, resume)
    run = frame.Run.start("baseline grpo", cfg, resume, resume_from, **options)
    task, train, held, data_seed = episode_data.load_examples(cfg)  # games checked
    games = isinstance(task, EnvironmentTask)  # rollouts are episodes (docs/agents.md)

    # 2. build
    d, t = cfg.data, cfg.training
    base = run.load_base()
    tok = base.tokenizer
    # Games: the engine plays a copy of the reasoner set to the policy's weights (before LoRA).
    rollout = episode_rollout(cfg, task, train, base) if games else None
    if init is not None:
        check_init_base(cfg, init, base)
        weaver_count = weaver_trainable_params(base.model, cfg.memory)  # before LoRA wraps it
        model, _, _ = load_baseline(cfg.init, base, trainable=True)
        lora, peft_config = dict(init["lora"]), None
        run.warn_prompt_suffix(init, cfg.init)
    else:
        model = base.model
        lora, peft_config, weaver_count = lora_settings(base, cfg.lora, cfg.memory)
    accuracy = won if games else rl.task_reward(task)
    funcs, weights = frame.reward_functions(accuracy, cfg.reward)
    grpo = sft_run.grpo_arguments(t)
    if games:  # cut replies leave the loss through the rollout's env_mask, each on its own
        grpo["mask_truncated_completions"] = False
    args = trl.GRPOConfig(
        **sft_run.trainer_arguments(t, run.ckpts, base.model.device),  # batch_size: completions
        **grpo,
        epsilon_high=t.epsilon_high,
        reward_weights=weights,
        activation_checkpointing=False,  # TRL turns it on by default; grpo-weaver does not
        log_completions=False,
    )
    acc: dict[str, float] = {}
    if held and run.main and run.resume_from is None:
        # A fresh LoRA's B is zero: before training, the adapted reasoner is the plain one.
        acc["initial"] = score(model, tok, held, accuracy, cfg, rollout)
    acc = run.begin(acc)  # a resumed run reads back what its fresh start measured
    if games:  # a prompt names its game; the rollout plays it (TRL repeats it G times)
        prompts = [{"prompt": e.id, "index": i} for i, e in enumerate(train)]
        rewards = [on_episodes(f, train, log=j == 0) for j, f in enumerate(funcs)]
    else:
        prompts = [
            {"prompt": to_messages(e, d.prompt_suffix, d.system), "index": i}
            for i, e in enumerate(train)
        ]
        rewards = [by_index(f, train) for f in funcs]
    datasets.disable_progress_bars()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=datasets.Dataset.from_list(prompts),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=run.callbacks(GRPOProgress, args),
        rollout_func=rollout,
    )
    model = trainer.model
    budget = measure_budget(model, weaver_count)
    run.header(
        f"LoRA r {lora['r']} on {', '.join(lora['targets'])}"
        + (f" from {cfg.init}" if cfg.init else "")
        + f", {budget_text(budget)}; "
        f"{len(train)} {'games' if games else 'prompts'} from {task.name}, "
        f"G={t.num_generations}, rewards "
        f"{', '.join(rl.reward_name(f) for f in funcs)}"
    )

    # 3. loop
    run.fit(trainer)

    # 4. save (main process; the others wait so that the run ends together)
    if run.main:
        if "ref" in model.peft_config:  # TRL's frozen copy of init's adapter for beta > 0
            model.delete_adapter("ref")
        if held:
            acc["final"] = score(model, tok, held, accuracy, cfg, rollout)
        summary = {
            "stage": "baseline-grpo",
            "method": "lora-grpo",
            **run.data_fields(task, data_seed),
            "samples": len(train),  # prompts: what `memgen eval` counts as drawn
            **({"episodes": {"max_turns": rollout.episode.max_turns}} if games else {}),
            "heldout_samples": len(held),
            "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()},
            **frame.grpo_fields(funcs, weights, t),
            "beta": t.beta,
            "init": cfg.init,
            **frame.first_and_final(trainer.state.log_history, "reward"),
            **run.trainer_fields(trainer),
        }
        out = run.save(
            save_baseline, model, base, summary, lora=lora, budget=budget, parent=cfg.init
        )
        run.console.print(summary_table(summary, lora, budget, out))
    return run.end(trainer)


def summary_table(s: dict, lora: dict, budget: dict, out: Path) -> Table:
    rows = [
        ("task", f"{s['task']} ({s['samples']} prompts, G={s['num_generations']})"),
        *lora_rows(lora, budget),
        *frame.trainer_rows(s, frame.first_and_final_row(s, "reward")),
        *frame.score_rows("held-out accuracy", s["heldout_accuracy"], 3),
    ]
    return frame.table(f"baseline grpo → {out}", rows)
