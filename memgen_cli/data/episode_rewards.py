"""Rewards of played episodes, as TRL-signature reward functions
``f(prompts, completions, **columns) -> list[float]``: an episode's ``prompts`` entry is its
first messages (system, first user turn), its ``completions`` entry the rest of the
conversation (assistant and user turns), and the columns are the examples' (``id``,
``question``, ``answer``, ...) plus ``episode_columns``: ``won``, ``turns``, ``invalid``,
``actions``, ``weaves``.

``won`` is the task reward of an environment task (``grpo-weaver`` on ``textworld:<challenge>``).
The shaping terms are plug-ins with a weight (``--reward memgen_cli.data.episode_rewards:
invalid_actions --reward-weight 0.02``): each returns a count with a minus sign, so its weight
is the penalty per unit. Keep a penalty's weight times ``max_turns`` below 1, so that a won
episode always outscores a lost one.
"""

from __future__ import annotations

from collections.abc import Sequence


def episode_columns(episodes: Sequence) -> dict[str, list]:
    """What reward functions receive of played episodes (``generation.episodes.Episode``)."""
    return {
        "won": [ep.won for ep in episodes],
        "turns": [ep.turns for ep in episodes],
        "invalid": [ep.invalid for ep in episodes],
        "actions": [list(ep.actions) for ep in episodes],
        "weaves": [ep.weaves for ep in episodes],
    }


def won(prompts, completions, won, **_) -> list[float]:
    """1 for an episode the agent won, else 0: the environment's verdict.

    >>> won(prompts=[[], []], completions=[[], []], won=[True, False])
    [1.0, 0.0]
    """
    return [float(w) for w in won]


def invalid_actions(prompts, completions, invalid, **_) -> list[float]:
    """Minus the episode's invalid actions (replies that named no admissible command).

    >>> invalid_actions(prompts=[[], []], completions=[[], []], invalid=[0, 3])
    [-0.0, -3.0]
    """
    return [-float(n) for n in invalid]


def turns(prompts, completions, turns, **_) -> list[float]:
    """Minus the episode's turns. Beware where a game can be lost (treasure_hunter): losing at
    once then beats exploring to the turn limit.

    >>> turns(prompts=[[]], completions=[[]], turns=[7])
    [-7.0]
    """
    return [-float(t) for t in turns]
