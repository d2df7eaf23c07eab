"""Trigger RL on episodes: the trigger decides once per turn, where each assistant turn begins.

``train-trigger`` on a ``textworld:<challenge>`` task plays, per game, G episodes together with
the episode engine (``generation.episodes.play``) in memory ``full``, the weaver frozen, the
trigger *sampling* its INVOKE/SKIP decision at each turn's start (``DecisionSampler`` as the
engine's ``decide`` hook; the decision reads the reasoner's state at the last token before the
turn, the state ``memgen eval`` thresholds). Clause boundaries below the cap
(``memory.max_inference_insertions``) are decisions too, as in single-turn trigger RL.

What follows is ``trigger_rl``'s, unchanged: each decision's state, choice and log-prob are
recorded (``TriggerRollouts``), the episode's reward (``won`` plus the ``--reward`` plug-ins
of ``data/episode_rewards.py``) minus the sparsity penalty of paper Eq. 9 goes to every
decision of the episode, advantages are group-relative over the G episodes of a game, and the
clipped objective re-applies the head to the recorded states (``trigger_update``).

- ``play_trigger_groups``: the rollouts (``TriggerRollouts`` with their ``episodes``);
- ``episode_task_rewards``: the weighted reward of each episode, as grpo-weaver on games;
- ``episode_metrics``: success, turns, invalid actions, and the weave rate at turn starts,
  overall and per turn number;
- ``episode_rows``: the completions log, one row per episode with its decisions by turn.
"""

from __future__ import annotations

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.data.base import Example
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.episode_rewards import episode_columns
from memgen_cli.generation.episodes import EpisodeConfig, agent_ids, environments, play
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training import rl
from memgen_cli.training.episode_grpo import episode_fields, episode_means, split_episode
from memgen_cli.training.trigger_rl import (
    TURN_START,
    DecisionSampler,
    TriggerRollouts,
    _all_reduce,
)


@torch.no_grad()
def play_trigger_groups(
    model: MemGenModel,
    task: EnvironmentTask,
    examples: list[Example],
    cfg: GenerationConfig,
    group_size: int,
    episode: EpisodeConfig,
    system: str | None = None,
) -> TriggerRollouts:
    """Play each example's game ``group_size`` times in one batch, the trigger sampling its
    decisions (seeded from ``cfg.seed``); ``cfg.memory`` must be ``full``."""
    sampler = DecisionSampler(model.trigger, cfg.seed + 1)
    with environments(task, [e for e in examples for _ in range(group_size)]) as envs:
        played = play(model, envs, cfg, episode, system=system, decide=sampler)
    width = model.reasoner.config.hidden_size
    return TriggerRollouts(
        group_size=group_size,
        completion_ids=[agent_ids(ep) for ep in played],  # each reply's stop token included
        finished=[all(ep.finished) for ep in played],
        decisions=[sampler.decisions.get(r, []) for r in range(len(played))],
        states=[
            torch.stack(sampler.states[r]) if r in sampler.states else torch.zeros(0, width)
            for r in range(len(played))
        ],
        insertions=[
            sum(i.kind == "inference" and i.inserted for turn in ep.insertions for i in turn)
            for ep in played
        ],
        episodes=played,
    )


def episode_task_rewards(
    roll: TriggerRollouts, examples: list[Example], funcs: list, weights: list[float]
) -> torch.Tensor:
    """Each episode's weighted reward (N,): the reward functions see it as a TRL conversation
    with the episode's columns (``won``, ``turns``, ``invalid``, ...), as in grpo-weaver."""
    group = [e for e in examples for _ in range(roll.group_size)]
    prompts, completions = zip(*map(split_episode, roll.episodes), strict=True)
    columns = {**rl.example_columns(group), **episode_columns(roll.episodes)}
    columns["completion_ids"] = roll.completion_ids
    _, total = rl.score(funcs, weights, list(prompts), list(completions), columns)
    return total


def turn_decisions(decisions) -> list[tuple[int, object]]:
    """(turn, decision) for each decision of an episode: a turn starts at each ``TURN_START``
    (the engine asks the trigger at every turn's start of a running episode)."""
    turn, out = -1, []
    for d in decisions:
        turn += d.token == TURN_START
        out.append((turn, d))
    return out


def episode_metrics(roll: TriggerRollouts, max_turns: int) -> dict:
    """``episodes/*``: success, turns, invalid-action rate, weaves per episode, the weave rate
    at turn starts (``turn_weave_rate``) and at each turn number (``weave_rate_by_turn``, None
    where no episode reached it). Summed over every process (torchrun)."""
    eps = roll.episodes
    sums = torch.tensor(
        [
            len(eps),
            sum(ep.won for ep in eps),
            sum(ep.turns for ep in eps),
            sum(ep.invalid for ep in eps),
            sum(ep.weaves for ep in eps),
        ],
        dtype=torch.float64,
    )
    by_turn = torch.zeros(2, max_turns, dtype=torch.float64)  # decisions, invocations
    for row in roll.decisions:
        for turn, d in turn_decisions(row):
            if d.token == TURN_START:
                by_turn[0, turn] += 1
                by_turn[1, turn] += d.invoke
    means = episode_means(*_all_reduce(sums).tolist())
    asked, invoked = _all_reduce(by_turn)
    return {
        **means,
        "episodes/turn_weave_rate": float(invoked.sum() / asked.sum()) if asked.sum() else None,
        "episodes/weave_rate_by_turn": [
            round(float(i / a), 4) if a else None for a, i in zip(asked, invoked, strict=True)
        ],
    }


def progress(m: dict) -> str:
    """The progress line's episode part: success, turns, and the weave rate at turn starts."""
    rate = m["episodes/turn_weave_rate"]
    return (
        f"  won {m['episodes/won']:.2f} turns {m['episodes/turns']:.1f} "
        f"weave/turn {'-' if rate is None else f'{rate:.2f}'}"
    )


def episode_rows(
    step: int, tokenizer, examples, roll: TriggerRollouts, per_row: dict, first_group: int = 0
) -> list[dict]:
    """The completions log's rows: each episode's transcript (⟨mem K⟩ where memory went in),
    actions, outcome, reward parts and every decision with its turn and probability."""
    g, out = roll.group_size, []
    for i, ep in enumerate(roll.episodes):
        out.append(
            {
                "step": step,
                "group": first_group + i // g,
                "id": examples[i // g].id,
                **episode_fields(tokenizer, ep),
                **{k: round(float(v[i]), 4) for k, v in per_row.items()},
                "decisions": [
                    {
                        "turn": turn + 1,
                        "token_index": d.token_index,
                        "token": None if d.token == TURN_START else tokenizer.decode([d.token]),
                        "prob": round(d.prob, 4),
                        "invoke": d.invoke,
                    }
                    for turn, d in turn_decisions(roll.decisions[i])
                ],
            }
        )
    return out
