"""LoRA-GRPO on episodes (``memgen baseline grpo`` on ``textworld:<challenge>``): TRL's own
multi-turn route, a ``rollout_func`` that plays the games with memgen's episode engine.

TRL 1.16's ``GRPOTrainer(rollout_func=...)`` takes, per rollout, ``prompt_ids``,
``completion_ids``, the sampling-time ``logprobs`` and an ``env_mask`` (1 on tokens the policy
chose, 0 on tokens the environment wrote; TRL multiplies it into the loss mask); any other
field reaches the reward functions as a column. So nothing here subclasses TRL:

- **Playing** (``EpisodeRollout``). TRL hands the rollout function the prompts of its batch,
  each repeated G times in a row (its ``RepeatSampler``): here a prompt is a game's example id,
  so the G copies of one game are a group. The games are played together by
  ``generation.episodes.play`` with memory off, sampling at ``temperature``, by a *player*: a
  ``MemGenModel`` over a copy of the base reasoner whose adapted weights are set, before each
  rollout, to the policy's W + ΔW (``sync_weights``; what ``memgen eval`` plays, the LoRA
  merged). The engine cannot take the PEFT model itself: ``MemGenModel`` puts its weaver's
  LoRA into the reasoner it wraps and switches every LoRA layer off for reasoner passes, which
  would switch the baseline's adapter off with it.
- **The completion** (``episode_completion``): the whole multi-turn continuation as the
  engine's cache held it, per turn the reply, its stop token and the ids fed after it (the
  chat template's turn break, the observation, the next assistant header); the mask is 1 on the
  replies and stop tokens only. A ChatML turn break starts with the stop token itself
  (``<|im_end|>``), so the two are one token; a template whose break starts otherwise gets the
  stop token inserted before it (one token more than the engine's context).
  ``mask_truncated_completions`` zeroes the mask of each reply cut at ``max_completion_length``
  (grpo-weaver's rule, per reply), so TRL's own whole-completion rule is turned off.
- **Rewards** (``on_episodes``): each reward function sees the episode as grpo-weaver's do, a
  TRL conversation (its first messages, the rest) with the example's columns and
  ``episode_columns`` (``won``, ``turns``, ``invalid``, ``actions``, ``weaves``), and
  ``completion_ids`` the agent's tokens only. The task reward's wrapper logs ``episodes/won``,
  ``episodes/turns`` and ``episodes/invalid_rate`` through TRL's ``log_metric`` hook.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from peft.tuners.lora import LoraLayer

from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.data.base import Example
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.episode_rewards import episode_columns
from memgen_cli.errors import MemgenError
from memgen_cli.generation.episodes import (
    Episode,
    EpisodeConfig,
    agent_ids,
    environments,
    picked,
    play,
)
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training import rl
from memgen_cli.training.episode_grpo import split_episode


def episode_completion(
    ep: Episode, mask_truncated: bool = False
) -> tuple[list[int], list[int], list[float]]:
    """One episode as TRL's completion: (ids, env_mask, sampling log-probs), one entry per
    token after ``ep.prompt_ids``. Environment tokens have mask 0 and log-prob 0.0; a reply cut
    at the length limit has mask 0 too with ``mask_truncated``."""
    ids: list[int] = []
    mask: list[int] = []
    logps: list[float] = []
    for t in range(ep.turns):
        stop, chosen = ep.stops[t], picked(ep, t)
        if len(ep.logprobs[t]) != len(chosen):
            raise ValueError("episodes must be played with keep_logprobs=True")
        keep = 0 if mask_truncated and stop is None else 1
        ids += chosen
        mask += [keep] * len(chosen)
        logps += ep.logprobs[t]
        if t < len(ep.breaks):  # what the engine fed after the reply (the stop token was not)
            fed = ep.breaks[t]
            if stop is not None and fed[:1] == [stop]:
                fed = fed[1:]  # the turn break starts with the stop token: one token
            ids += fed
            mask += [0] * len(fed)
            logps += [0.0] * len(fed)
    return ids, mask, logps


def player_for(base_model, tokenizer) -> MemGenModel:
    """A memory-off ``MemGenModel`` over a copy of ``base_model`` (call before any LoRA wraps
    it): the engine plays the policy through it once ``sync_weights`` has set its weights."""
    return MemGenModel(copy.deepcopy(base_model), tokenizer, MemoryConfig()).eval()


def _base(module):
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


@torch.no_grad()
def sync_weights(player: MemGenModel, policy) -> None:
    """Set each LoRA-adapted layer of ``player``'s reasoner to the ``policy``'s (a PEFT model)
    W + ΔW of its active adapter; every other weight is the base's in both already."""
    layers = dict(player.reasoner.named_modules())
    for name, module in policy.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = _base(module).weight
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter)
        _base(layers[name]).weight.copy_(weight)


def _has_lora(model) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


class EpisodeRollout:
    """TRL's ``rollout_func`` for games: ``(prompts, trainer) -> dict``, a prompt being a game's
    example id; ``player`` (``player_for``) plays them, set to the trainer's policy first."""

    def __init__(
        self,
        player: MemGenModel,
        task: EnvironmentTask,
        examples: Sequence[Example],
        episode: EpisodeConfig,
        system: str | None,
        mask_truncated: bool,
    ):
        self.by_id = {e.id: e for e in examples}
        if len(self.by_id) != len(examples):
            raise MemgenError(
                f"{task.name}: two games share an id; a rollout cannot tell them apart"
            )
        self.player, self.task, self.episode = player, task, episode
        self.system, self.mask_truncated = system, mask_truncated
        self.step, self.calls = -1, 0

    def __call__(self, prompts: list[str], trainer) -> dict[str, list]:
        args = trainer.args
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if _has_lora(policy):
            sync_weights(self.player, policy)
        # A seed per (step, rollout within the step): a resumed run samples as an unbroken one.
        step = trainer.state.global_step
        self.calls = self.calls + 1 if step == self.step else 0
        self.step = step
        seed = ((args.seed * 1_000_003 + step) * 1009 + self.calls) * 31 + args.process_index
        cfg = GenerationConfig(
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=seed,
            memory="off",
        )
        played = self.play([self.by_id[p] for p in prompts], cfg, keep_logprobs=True)
        rows = [episode_completion(ep, self.mask_truncated) for ep in played]
        ids, masks, logps = (list(x) for x in zip(*rows, strict=True))
        first, rest = zip(*map(split_episode, played), strict=True)
        return {
            "prompt_ids": [ep.prompt_ids for ep in played],
            "completion_ids": ids,
            "logprobs": logps,
            "env_mask": masks,
            "episode_prompt": list(first),
            "episode_completion": list(rest),
            "agent_ids": [agent_ids(ep) for ep in played],
            **episode_columns(played),
        }

    def play(self, examples: list[Example], cfg: GenerationConfig, keep_logprobs=False):
        with environments(self.task, examples) as envs:
            return play(self.player, envs, cfg, self.episode, self.system, keep_logprobs)

    def success_rate(
        self, policy, examples: list[Example], max_new_tokens: int, batch: int = 8
    ) -> float:
        """The share of ``examples``' games the ``policy`` wins greedily (``memgen eval``'s
        success rate of a LoRA baseline: memory off, the adapter merged)."""
        if _has_lora(policy):
            sync_weights(self.player, policy)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, memory="off")
        won = 0
        for i in range(0, len(examples), batch):
            won += sum(ep.won for ep in self.play(list(examples[i : i + batch]), cfg))
        return won / max(len(examples), 1)


EPISODE_KEYS = ("won", "turns", "invalid", "actions", "weaves")


def on_episodes(fn: rl.RewardFn, examples: Sequence[Example], log: bool = False) -> rl.RewardFn:
    """``fn`` as TRL calls it, with what grpo-weaver's reward functions get of an episode (the
    rollout's fields); through ``rl.score``, so a failing reward stops the run with one message.
    ``log``: report the episodes' figures through TRL's ``log_metric`` hook."""

    def reward(prompts, completions, index, episode_prompt, episode_completion, **kw):
        columns = rl.example_columns([examples[i] for i in index])
        columns.update({k: kw[k] for k in EPISODE_KEYS})
        columns["completion_ids"] = kw["agent_ids"]
        table, _ = rl.score([fn], [1.0], episode_prompt, episode_completion, columns)
        if log and "log_metric" in kw:
            turns = sum(kw["turns"])
            kw["log_metric"]("episodes/won", sum(kw["won"]) / len(index))
            kw["log_metric"]("episodes/turns", turns / len(index))
            kw["log_metric"]("episodes/invalid_rate", sum(kw["invalid"]) / max(turns, 1))
        return [None if math.isnan(v) else v for v in table[:, 0].tolist()]

    reward.__name__ = reward.__qualname__ = rl.reward_name(fn)  # TRL's metric names
    return reward
