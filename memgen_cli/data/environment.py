"""Environment tasks: a problem is a game to play, not a question to answer.

An environment task (``textworld:<challenge>``) loads its games as :class:`Example` records
like any task, and ``environment(example)`` starts one of them. The episode engine
(``memgen_cli.generation.episodes``) plays a batch of them together: it shows the agent each
:class:`Observation`'s text as a user turn, reads the action from the agent's reply (its first
line, matched against ``commands``) and calls ``step`` with it, or with ``None`` when the reply
named no admissible command (an invalid action: the environment answers it, and the game does
not advance). An episode ends when an observation says ``done`` or at the task's turn limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from memgen_cli.data.base import Example, Task
from memgen_cli.errors import MemgenError


@dataclass
class Observation:
    """What the environment says after a reset or a step."""

    text: str  # the next user turn, already formatted by the task (commands listed if asked)
    commands: list[str]  # the admissible commands now
    reward: float = 0.0  # reward of the step that led here (0 after a reset)
    done: bool = False  # the episode is over (won or lost)
    won: bool = False
    expert: list[str] | None = None  # the shortest plan from here, where the game knows one
    # A reset's only: example turns (user, assistant, ...) the task shows before the game.
    shots: list[dict[str, str]] = field(default_factory=list)


class Environment(Protocol):
    """One running episode of an environment task."""

    def reset(self) -> Observation: ...

    def step(self, action: str | None) -> Observation:
        """Play ``action`` (one of the last observation's commands), or answer an invalid
        action (``None``) without advancing the game."""
        ...

    def close(self) -> None: ...


class EnvironmentTask(Task):
    """A task whose examples are games: ``environment(example)`` starts one, ``max_turns``
    bounds an episode, ``system`` is the system turn of its prompt (or None)."""

    max_turns: int = 20
    system: str | None = None

    def environment(self, example: Example) -> Environment:
        raise NotImplementedError

    def grade(self, completion: str, example: Example) -> float:
        raise MemgenError(
            f"{self.name} is an environment task: its games are played as episodes, and an "
            "episode is scored by whether it was won, not by grading one completion."
        )


GAME_TASKS = ("textworld:",)  # the task prefixes whose problems are games
