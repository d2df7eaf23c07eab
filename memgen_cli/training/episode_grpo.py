"""GRPO on episodes: ``grpo.GRPOTrainer``'s loop, with an episode as the rollout.

The loop, loss, clipping, KL, logs and checkpoints are ``GRPOTrainer``'s; this trainer fills
its rollout hooks:

- ``_rollout``: a group is G episodes of one game (the same seed), played together by the
  episode engine with sampling (``episode_rollouts.EpisodeRollouts``);
- ``_rewards``: the reward functions see each episode as a TRL conversation (its first
  messages as the prompt, the rest as the completion) with the episode's columns (``won``,
  ``turns``, ``invalid``, ...: ``data/episode_rewards.py``); the task reward is ``won``;
- ``_policy_batch`` / ``policy_rows``: the scoring rows (``episode_inputs``: per episode, or
  per turn with ``memory.keep_latents`` false) and, per episode, every token the agent chose;
  ``mask_truncated_completions`` leaves out the tokens of replies cut at the length limit;
- logs: ``episodes/won``, ``episodes/turns``, ``episodes/invalid_rate``, ``episodes/weaves``
  beside GRPO's own (``completions/*`` count an episode's agent tokens; ``clipped_ratio``: the
  share of episodes with a reply cut at ``max_completion_length``), and the completions log
  holds each episode's transcript with ⟨mem K⟩ markers.

``success_rate``: greedy episodes on held-out games, as ``memgen eval`` plays them.
"""

from __future__ import annotations

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.data.base import Example
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.episode_rewards import episode_columns
from memgen_cli.evaluation.episodes import marked_messages
from memgen_cli.generation.episodes import Episode, EpisodeConfig, environments, play
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training import rl
from memgen_cli.training.episode_rollouts import EpisodeRollouts, episode_inputs
from memgen_cli.training.grpo import GRPOTrainer
from memgen_cli.training.grpo_parts import gather_list


def split_episode(ep: Episode) -> tuple[list[dict], list[dict]]:
    """An episode as a TRL conversation: (prompt messages, completion messages); the prompt
    ends with the game's first observation."""
    return ep.messages[: ep.head], ep.messages[ep.head :]


def episode_fields(tokenizer, ep: Episode) -> dict:
    """An episode's part of a completions-log record: its first user turn, the rest of the
    conversation (⟨mem K⟩ where memory went in), its actions and its outcome."""
    prompt = split_episode(ep)[0]
    return {
        "prompt": prompt[-1]["content"],
        "completion": marked_messages(tokenizer, ep)[len(prompt) :],
        "actions": ep.actions,
        "won": ep.won,
        "turns": ep.turns,
        "invalid": ep.invalid,
    }


def episode_means(n: float, won: float, turns: float, invalid: float, weaves: float) -> dict:
    """``episodes/*`` from the sums over ``n`` episodes: the success rate, turns and weaves per
    episode, and invalid actions per turn."""
    return {
        "episodes/won": won / max(n, 1),
        "episodes/turns": turns / max(n, 1),
        "episodes/invalid_rate": invalid / max(turns, 1),
        "episodes/weaves": weaves / max(n, 1),
    }


class EpisodeGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollouts are episodes of ``task``'s games (``episode``: the turn
    limit and ``keep_latents``); the other arguments are ``GRPOTrainer``'s."""

    def __init__(self, *, task: EnvironmentTask, episode: EpisodeConfig, **kwargs):
        super().__init__(**kwargs)
        self.task, self.episode = task, episode

    def _rollout(self, exs: list[Example], cfg: GenerationConfig) -> EpisodeRollouts:
        g, episode, system = self.s.num_generations, self.episode, self.s.system
        with environments(self.task, [e for e in exs for _ in range(g)]) as envs:
            played = play(self.policy, envs, cfg, episode, system, keep_logprobs=True)
        return EpisodeRollouts(g, played, episode.keep_latents)

    def _rewards(self, roll: EpisodeRollouts, group: list[Example]):
        prompts, completions = zip(*map(split_episode, roll.episodes), strict=True)
        columns = {**rl.example_columns(group), **episode_columns(roll.episodes)}
        columns["completion_ids"] = roll.completion_ids
        funcs, weights = self.reward_funcs, self.reward_weights
        return rl.score(funcs, weights, list(prompts), list(completions), columns)

    def _policy_batch(self, roll: EpisodeRollouts) -> dict:
        pad = self.policy.tokenizer.pad_token_id
        batch, grids = episode_inputs(roll.episodes, roll.keep_latents, pad)
        loss_mask = grids["completion_mask"].clone()
        if self.s.mask_truncated_completions:
            loss_mask[grids["truncated"]] = 0
        device = self.policy.device
        return {
            "episodes": batch.to(device),
            "completion_mask": grids["completion_mask"].to(device),
            "sampling_logps": grids["sampling_logps"].to(device),
            "loss_mask": loss_mask.to(device),
        }

    def policy_rows(self, inputs: dict, rows: torch.Tensor | None = None) -> dict:
        batch = inputs["episodes"]
        if rows is None or len(rows) == batch.episodes:
            return {"episodes": batch}
        return {"episodes": batch.select(rows.tolist())}

    def _record_rollouts(self, rolls, tables, rewards, all_rewards, flat, rollout_s, score_s):
        super()._record_rollouts(rolls, tables, rewards, all_rewards, flat, rollout_s, score_s)
        eps = [ep for r in rolls for ep in r.episodes]
        figures = gather_list([(ep.won, ep.turns, ep.invalid, ep.weaves) for ep in eps])
        sums = (sum(x) for x in zip(*figures, strict=True))
        for key, value in episode_means(len(figures), *sums).items():
            self._metrics[key].append(value)

    def _completion(self, roll: EpisodeRollouts, r: int, ex: Example) -> tuple[dict, int]:
        ep = roll.episodes[r]
        return episode_fields(self.policy.tokenizer, ep), ep.weaves


def success_rate(
    model: MemGenModel,
    task: EnvironmentTask,
    examples: list[Example],
    max_new_tokens: int,
    memory: str,
    episode: EpisodeConfig,
    system: str | None = None,
    batch: int = 8,
) -> float:
    """The share of ``examples``' games won by greedy episodes (``memgen eval``'s accuracy)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, memory=memory)
    won = 0
    for i in range(0, len(examples), batch):
        with environments(task, examples[i : i + batch]) as envs:
            won += sum(ep.won for ep in play(model, envs, cfg, episode, system))
    return won / max(len(examples), 1)
