"""TextWorld text games as agent tasks, generated and played offline: ``textworld:coin_collector``
and ``textworld:treasure_hunter``.

Each game is made from a seed by TextWorld's own challenge generator (the same seed gives the
same game) and cached on disk, keyed by (TextWorld version, challenge, level, objective, seed):
``$MEMGEN_HOME/textworld/textworld-1.7.0/coin_collector/level5-brief/{seed}.{meta.json,json,z8}``
(``meta.json``: walkthrough and objective, written when the game is made, about a second;
``json`` + ``z8``: the compiled game, written the first time it is played, about another).

Splits: ``train`` plays seeds ``TRAIN_SEED + i``; the evaluation splits (``test``,
``validation``, ``eval``) play seeds from ``EVAL_SEED`` on, skipping any seed in the training
range and any game whose walkthrough equals one of the first ``exclude_train`` training games'
(at low levels few routes exist, so held-out games repeat training routes; issue 24 counted 8
distinct walkthroughs in 15 coin_collector level-3 seeds).

Options (``--task-option`` / ``data.options``):
  level          difficulty: coin_collector 1-300 (101+ add distractor rooms), treasure_hunter
                 1-30 (11+ add doors and containers); default 5
  objective      ``detailed`` (as generated: it spells out the whole route) or ``brief`` (the
                 goal without the route, "Find the coin and take it."): the agent must explore
                 and remember where it has been
  max_turns      turn limit of an episode (default 20)
  commands       list the admissible commands in every user turn (default true)
  size           games when no limit is given (default 1000 train, 200 held out)
  exclude_train  training games whose walkthroughs held-out games must differ from (default
                 200; set it to the training set's size)
  shots          example turns shown before the game, 0-2 (default 0): the turns of one small
                 hand-written game (``EXAMPLE``: a hall, "go north", a den, "take key") as
                 user and assistant turns, so that a model never trained on games sees what a
                 reply is (the embedded SmolLM2-135M-Instruct names no command without them:
                 0 of 32 first replies valid, 32 of 32 with 2; docs/agents.md)

The prompt: the first user turn is the game's opening (banner and status line stripped: the
objective, then the room), the admissible commands and one instruction; each later user turn
is the cleaned answer to the last command, with the commands then admissible. Example turns,
when asked for, come before the first user turn, formatted the same way.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from memgen_cli.atomic import write_file
from memgen_cli.data.base import Example
from memgen_cli.data.environment import EnvironmentTask, Observation
from memgen_cli.errors import MemgenError, did_you_mean

INSTALL = "pip install 'textworld==1.7.0'"


@dataclass(frozen=True)
class Challenge:
    generator: str  # TextWorld's registry name
    levels: int  # levels 1 .. levels


CHALLENGES = {
    "coin_collector": Challenge("tw-coin_collector", 300),
    "treasure_hunter": Challenge("tw-treasure_hunter", 30),
}
OBJECTIVES = ("detailed", "brief")
TRAIN_SEED = 1
# Held-out seeds start far above any training set (the gym tasks' convention, data/gym.py).
EVAL_SEED = 1_000_000
DEFAULT_SIZE = {"train": 1000, "eval": 200}
# Held-out games tried per game asked for before giving up: at low levels most routes repeat.
TRIES_PER_GAME = 10
# Games made (not found in the cache) between progress lines while held-out games are sought:
# at a level with few routes, hundreds are made (about a second each) before a game is played.
PROGRESS_EVERY = 100
INSTRUCTION = "Reply with one of the available commands and nothing else."
INVALID = "That is not one of the available commands."
# The example game of the ``shots`` option: (what the agent sees, the commands, its reply).
EXAMPLE = (
    (
        "Find the key and take it.\n\n-= Hall =-\nYou are in a hall. There is an exit to the north.",
        ["go north", "inventory", "look"],
        "go north",
    ),
    (
        "-= Den =-\nYou are in a den. There is a key on the floor. There is an exit to the south.",
        ["go south", "take key", "inventory", "look"],
        "take key",
    ),
)
BANNER = set(" _|\\$/<>")  # the characters of TextWorld's ASCII-art title


def require_textworld():
    """The ``textworld`` module, or one MemgenError naming the command that installs it."""
    try:
        import textworld
        import textworld.challenges
        import textworld.gym
    except ImportError as e:
        raise MemgenError(
            f"textworld tasks need TextWorld, which is not installed ({e}). Install it with: "
            f"{INSTALL} (memgen's agents extra: pip install -e '.[agents]'; `make setup` "
            "installs it)."
        ) from None
    return textworld


def clean_observation(text: str) -> str:
    """A TextWorld observation without the title banner, the ``>`` prompt and the status line.

    >>> clean_observation("  __ \\\\$$ |\\n\\nFind the coin.\\n\\n\\n\\n-= Hall =-\\nA hall.\\n"
    ...                   ">          -= Hall =-0/1")
    'Find the coin.\\n\\n-= Hall =-\\nA hall.'
    """
    lines = []
    for line in text.splitlines():
        line = re.sub(r">?\s{4,}-= .* =-\d+/\d+\s*$", "", line).rstrip()  # status line
        stripped = line.strip()
        if stripped.startswith(">") or (stripped and set(stripped) <= BANNER):
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def brief_objective(walkthrough: list[str]) -> str:
    """The goal without the route, from the walkthrough's last command.

    >>> brief_objective(["go east", "go north", "take latchkey from pan"])
    'Find the latchkey and take it.'
    """
    match = re.fullmatch(r"take (.+?)(?: from .+)?", walkthrough[-1]) if walkthrough else None
    if match is None:
        raise MemgenError(f"cannot state a brief objective for the walkthrough {walkthrough}.")
    return f"Find the {match[1]} and take it."


class TextWorldTask(EnvironmentTask):
    """``textworld:<challenge>``: the options are in the module docstring."""

    default_split = "test"
    train_seed = TRAIN_SEED
    eval_seed = EVAL_SEED

    def __init__(
        self,
        challenge: str,
        level: int = 5,
        objective: str = "detailed",
        max_turns: int = 20,
        commands: bool = True,
        size: int | None = None,
        exclude_train: int = 200,
        shots: int = 0,
    ):
        if challenge not in CHALLENGES:
            raise MemgenError(
                f"textworld has no challenge {challenge!r}; the challenges are "
                f"{', '.join('textworld:' + c for c in CHALLENGES)}."
                + did_you_mean(challenge, CHALLENGES)
            )
        top = CHALLENGES[challenge].levels
        checks = [
            (isinstance(level, int) and 1 <= level <= top, f"level must be 1-{top}"),
            (objective in OBJECTIVES, f"objective must be {' or '.join(OBJECTIVES)}"),
            (isinstance(max_turns, int) and max_turns >= 1, "max_turns must be at least 1"),
            (isinstance(exclude_train, int) and exclude_train >= 0, "exclude_train must be >= 0"),
            (
                isinstance(shots, int) and 0 <= shots <= len(EXAMPLE),
                f"shots must be 0-{len(EXAMPLE)} (example turns before the game)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MemgenError(f"textworld:{challenge}: {message}.")
        require_textworld()
        self.challenge, self.level, self.objective = challenge, level, objective
        self.name = f"textworld:{challenge}"
        self.max_turns, self.commands = max_turns, commands
        self.size, self.exclude_train, self.shots = size, exclude_train, shots

    # ------------------------------------------------------------------------------- games
    def cache_dir(self) -> Path:
        from memgen_cli.models.base import memgen_home  # torch-heavy module: only when needed

        return (
            memgen_home()
            / "textworld"
            / f"textworld-{version('textworld')}"
            / self.challenge
            / f"level{self.level}-{self.objective}"
        )

    def _meta(self, seed: int) -> Path:
        """Where the description of the game of ``seed`` is cached."""
        return self.cache_dir() / f"{seed}.meta.json"

    def game(self, seed: int) -> dict:
        """The cached description of the game of ``seed`` (made now if not cached): its
        walkthrough and objective."""
        meta = self._meta(seed)
        if meta.is_file():
            return json.loads(meta.read_text())
        return self._describe(self._make(seed), seed)

    def _describe(self, game, seed: int) -> dict:
        info = {
            "challenge": self.challenge,
            "level": self.level,
            "seed": seed,
            "objective": game.objective,
            "walkthrough": list(game.walkthrough),
            "uuid": game.metadata["uuid"],
        }
        meta = self._meta(seed)
        meta.parent.mkdir(parents=True, exist_ok=True)
        write_file(meta, json.dumps(info, indent=1))
        return info

    def _make(self, seed: int):
        tw = require_textworld()
        options = tw.GameOptions()
        options.seeds = seed
        make = tw.challenges.CHALLENGES[CHALLENGES[self.challenge].generator][1]
        with warnings.catch_warnings():  # jericho on the scratch game coin_collector checks
            warnings.filterwarnings("ignore", message="Game .* is not fully supported")
            game = make({"level": self.level}, options)
        if self.objective == "brief":  # the game's opening text shows the objective it is given
            game.objective = brief_objective(game.walkthrough)
        return game

    def compiled(self, seed: int) -> Path:
        """The playable file of the game of ``seed`` (compiled now if not cached), with
        TextWorld's game description beside it (``{seed}.json``, which its infos need)."""
        folder = self.cache_dir()
        target = folder / f"{seed}.z8"
        if target.is_file() and target.with_suffix(".json").is_file():
            return target
        tw = require_textworld()
        game = self._make(seed)
        if not self._meta(seed).is_file():
            self._describe(game, seed)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".compile-") as tmp:
            options = tw.GameOptions()
            options.path = str(Path(tmp) / "game.z8")
            options.force_recompile = True
            made = Path(tw.generator.compile_game(game, options))
            # The description first: a z8 found without it is compiled again.
            shutil.move(made.with_suffix(".json"), target.with_suffix(".json"))
            shutil.move(made, target)
        return target

    # ------------------------------------------------------------------------------ splits
    def load(
        self, split: str | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        split = split or self.default_split
        base = self.seed_for(split) if seed is None else seed
        if limit is not None and limit < 0:
            raise MemgenError(f"limit must be >= 0, got {limit}")
        n = limit if limit is not None else self.size or DEFAULT_SIZE[_kind(split)]
        train = split == "train"
        if n + (0 if train else self.exclude_train) > 20:
            self._note(
                f"{n} training games"
                if train
                else f"{self.exclude_train} training and {n}+ held-out games"
            )
        seeds = list(range(base, base + n)) if train else self.heldout(base, n)
        return [self.example(s, split) for s in seeds]

    def heldout(self, start: int, n: int) -> list[int]:
        """``n`` seeds from ``start`` on whose games are not training games: outside the first
        ``exclude_train`` training seeds, with a walkthrough none of those games has."""
        train = range(self.train_seed, self.train_seed + self.exclude_train)
        routes = {tuple(self.game(s)["walkthrough"]) for s in train}
        seeds, tries, made = [], TRIES_PER_GAME * n + 100, 0
        for seed in range(start, start + tries):
            if len(seeds) == n:
                break
            if seed in train:
                continue
            new = not self._meta(seed).is_file()
            if tuple(self.game(seed)["walkthrough"]) not in routes:
                seeds.append(seed)
            made += new
            if new and made % PROGRESS_EVERY == 0:  # a log's line while the search is long
                self._say(
                    f"{self.name}: {made} games made, {len(seeds)} of {n} held-out games "
                    f"found (seeds {start}-{seed})"
                )
        if len(seeds) < n:
            raise MemgenError(
                f"{self.name} level {self.level}: only {len(seeds)} of {tries} held-out games "
                f"have a walkthrough that none of the first {self.exclude_train} training games "
                f"has, fewer than the {n} asked for (few routes exist at this level). Raise the "
                "level, or lower exclude_train or the number of games."
            )
        return seeds

    def _note(self, what: str) -> None:
        """Say once, before a first long generation, what is being made and where it goes."""
        if not any(self.cache_dir().glob("*.meta.json")):
            self._say(
                f"{self.name}: making up to {what} (about a second each, cached in "
                f"{self.cache_dir()})"
            )

    @staticmethod
    def _say(text: str) -> None:
        from memgen_cli.console import make_console

        make_console(stderr=True).print(text, highlight=False)

    def example(self, seed: int, split: str) -> Example:
        info = self.game(seed)
        return Example(
            id=f"{self.challenge}-level{self.level}-{seed}",
            question=info["objective"],
            answer="; ".join(info["walkthrough"]),
            solution="\n".join(info["walkthrough"]),
            meta={"seed": seed, "split": split, "walkthrough": info["walkthrough"]},
        )

    def environment(self, example: Example) -> TextWorldEnvironment:
        return TextWorldEnvironment(
            self.compiled(example.meta["seed"]), self.max_turns, self.commands, self.shots
        )


def _kind(split: str) -> str:
    return "train" if split == "train" else "eval"


class TextWorldEnvironment:
    """One game being played (``data.environment.Environment``): only admissible commands
    reach the game; an invalid action (``None``) is answered without advancing it."""

    def __init__(self, path: Path, max_turns: int, commands: bool = True, shots: int = 0):
        tw = require_textworld()
        infos = tw.EnvInfos(
            admissible_commands=True, policy_commands=True, won=True, lost=True, score=True
        )
        env_id = tw.gym.register_game(str(path), request_infos=infos, max_episode_steps=max_turns)
        self.env = tw.gym.make(env_id)
        self.commands, self.shots = commands, shots
        self.score = 0.0
        self.last: Observation | None = None

    def reset(self) -> Observation:
        text, infos = self.env.reset()
        self.score = 0.0
        return self._observe(text, infos, first=True)

    def step(self, action: str | None) -> Observation:
        if self.last is None:
            raise RuntimeError("step before reset")
        if action is None or action not in self.last.commands:
            last = self.last
            return Observation(self._turn(INVALID, last.commands), last.commands, 0.0, False,
                               False, last.expert)  # fmt: skip
        text, score, done, infos = self.env.step(action)
        reward, self.score = float(score) - self.score, float(score)
        return self._observe(text, infos, reward=reward, done=bool(done))

    def close(self) -> None:
        self.env.close()

    def _observe(self, text: str, infos: dict, reward=0.0, done=False, first=False):
        commands = list(infos["admissible_commands"])
        won = bool(infos["won"])
        turn = self._turn(clean_observation(text), commands, first)
        self.last = Observation(
            turn, commands, reward, done or won or bool(infos["lost"]), won,
            list(infos["policy_commands"]), self.example_turns() if first else [],
        )  # fmt: skip
        return self.last

    def example_turns(self) -> list[dict[str, str]]:
        """The first ``shots`` turns of ``EXAMPLE``, formatted as the game's own turns."""
        out = []
        for i, (text, commands, reply) in enumerate(EXAMPLE[: self.shots]):
            out += [
                {"role": "user", "content": self._turn(text, commands, first=i == 0)},
                {"role": "assistant", "content": reply},
            ]
        return out

    def _turn(self, text: str, commands: list[str], first: bool = False) -> str:
        listed = f"\n\nAvailable commands: {', '.join(commands)}." if self.commands else ""
        return text + listed + (f"\n{INSTRUCTION}" if first else "")
