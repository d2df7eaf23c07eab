"""GRPO on episodes: ``grpo.GRPOTrainer``'s loop, with an episode as the rollout.

The loop, loss, clipping, KL, logs and checkpoints are ``GRPOTrainer``'s; this trainer fills
its rollout hooks:

- ``_rollout``: a group is G episodes of one game (the same seed), played together by the
  episode engine with sampling (``episode_rollouts.play_groups``);
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

import json

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.data.base import Example
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.episode_rewards import episode_columns
from memgen_cli.evaluation.episodes import marked
from memgen_cli.generation.episodes import Episode, EpisodeConfig
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training import rl
from memgen_cli.training.episode_rollouts import EpisodeRollouts, episode_inputs, play_groups
from memgen_cli.training.grpo import GRPOTrainer, _gather_list, _num


def split_episode(ep: Episode) -> tuple[list[dict], list[dict]]:
    """An episode as a TRL conversation: (prompt messages, completion messages)."""
    first = next(i for i, m in enumerate(ep.messages) if m["role"] == "user") + 1
    return ep.messages[:first], ep.messages[first:]


class EpisodeGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollouts are episodes of ``task``'s games (``episode``: the turn
    limit and ``keep_latents``); the other arguments are ``GRPOTrainer``'s."""

    def __init__(self, *, task: EnvironmentTask, episode: EpisodeConfig, **kwargs):
        super().__init__(**kwargs)
        self.task, self.episode = task, episode

    def _rollout(self, exs: list[Example], cfg: GenerationConfig) -> EpisodeRollouts:
        s = self.s
        return play_groups(
            self.policy, self.task, exs, cfg, s.num_generations, self.episode, s.system
        )

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
        figures = _gather_list([(ep.won, ep.turns, ep.invalid, ep.weaves) for ep in eps])
        won, turns, invalid, weaves = (list(x) for x in zip(*figures, strict=True))
        m = self._metrics
        m["episodes/won"].append(sum(won) / len(won))
        m["episodes/turns"].append(sum(turns) / len(turns))
        m["episodes/invalid_rate"].append(sum(invalid) / max(sum(turns), 1))
        m["episodes/weaves"].append(sum(weaves) / len(weaves))

    def _log_completions(self, step, rows, rolls, tables, rewards, adv):
        names = [rl.reward_name(f) for f in self.reward_funcs]
        tok, records, i = self.policy.tokenizer, [], 0
        for group, roll, table in zip(rows, rolls, tables, strict=True):
            for r, (ex, ep) in enumerate(zip(group, roll.episodes, strict=True)):
                replies = iter(marked(tok, ep, t) for t in range(ep.turns))
                transcript = [
                    {"role": "assistant", "content": next(replies)}
                    if m["role"] == "assistant"
                    else m
                    for m in split_episode(ep)[1]
                ]
                records.append(
                    {
                        "id": ex.id,
                        "prompt": split_episode(ep)[0][-1]["content"],
                        "completion": transcript,
                        "actions": ep.actions,
                        "won": ep.won,
                        "turns": ep.turns,
                        "invalid": ep.invalid,
                        "rewards": {n: _num(table[r, j]) for j, n in enumerate(names)},
                        "reward": _num(rewards[i]),
                        "advantage": round(float(adv[i]), 4),
                        "insertions": ep.weaves,
                        "finished": all(ep.finished),
                    }
                )
                i += 1
        records = _gather_list(records)
        if self.args.process_index == 0:
            self.completions_dir.mkdir(parents=True, exist_ok=True)
            path = self.completions_dir / f"step_{step:05d}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))


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
        part = examples[i : i + batch]
        roll = play_groups(model, task, part, cfg, 1, episode, system)
        won += sum(ep.won for ep in roll.episodes)
    return won / max(len(examples), 1)
