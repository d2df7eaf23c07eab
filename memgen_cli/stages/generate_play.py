"""``memgen generate --play textworld:<challenge>``: play one game and print its transcript.

    memgen generate --play textworld:coin_collector --artifact DIR [--seed N] [--task-option k=v]

The game is the one ``memgen eval --data <task> --limit 1`` plays first with the same ``--seed``
and task options (the artifact's recorded ones when none are given), played the same way
(``evaluation.episodes.play_batch``: the episode engine, the artifact's ``keep_latents``), so
the actions equal eval's for the same game, seed and greedy decoding. Printed turn by turn: the
observation, the agent's reply with ``⟨mem K⟩`` where memory was woven, the action it named (or
"invalid"); then the outcome. ``--json``: eval's prediction record of the episode, with the
game's seed and the task options.
"""

from __future__ import annotations

import json
import re

from rich.console import Console
from rich.text import Text

from memgen_cli.artifacts import read_manifest
from memgen_cli.config import GenerationConfig
from memgen_cli.console import make_console
from memgen_cli.data import get_task, to_messages
from memgen_cli.data.environment import GAME_TASKS, EnvironmentTask
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.episodes import play_batch
from memgen_cli.evaluation.heldout import data_seed
from memgen_cli.evaluation.plan import Problem, parse_task_options, task_options
from memgen_cli.stages.common import check_memory, open_session, resolve_memory

MARKERS = re.compile(r"⟨mem \d+⟩")


def check_play(opts) -> None:
    """``--play``'s refusals, before anything loads (``opts``: ``GenerateOptions``)."""
    others = [
        flag
        for flag, given in (
            ("a PROMPT", opts.prompt is not None),
            ("--input", opts.input is not None),
            ("--output", opts.output is not None),
            ("--interactive", opts.interactive),
            ("--retrieval", opts.retrieval is not None),
        )
        if given
    ]
    if others:
        raise MemgenError(
            f"--play plays one game and prints it; give it without {', '.join(others)} "
            "(--json prints the episode as one object)."
        )
    if not opts.play.startswith(GAME_TASKS):
        raise MemgenError(
            f"--play needs a game task (textworld:coin_collector, textworld:treasure_hunter); "
            f"{opts.play!r} is not one. Ask a question with a PROMPT, or score a task with "
            "`memgen eval --data TASK`."
        )
    check_memory(opts.gen.memory)


def run(opts, console: Console) -> dict:
    """Play the game and print it; return eval's record of the episode (+ seed, options)."""
    check_play(opts)
    manifests = [read_manifest(opts.artifact)] if opts.artifact is not None else []
    if manifests and manifests[0].get("kind") == "retrieval":
        raise MemgenError(
            "--play cannot use a retrieval artifact: episodes run weaver artifacts and the plain "
            "reasoner (eval refuses it on games too)."
        )
    notes = make_notes(opts.json, console)
    options = task_options(opts.play, parse_task_options(opts.task_options), manifests, notes)
    task = get_task(opts.play, **options)
    if not isinstance(task, EnvironmentTask):  # a prefix the registry does not map to a game
        raise MemgenError(f"--play needs a game task; {opts.play!r} is not one.")
    seed = data_seed(task, opts.play_seed, 1, manifests, notes)
    session = open_session(
        opts.base, opts.artifact, opts.device, opts.dtype, opts.allow_base_mismatch
    )
    memory = resolve_memory(session, opts.gen.memory, notes)
    # eval samples with its data seed when one is given (batch 0: + 0)
    sampling = opts.gen.seed if opts.play_seed is None else opts.play_seed
    gen = GenerationConfig(
        opts.gen.max_new_tokens, opts.gen.temperature, opts.gen.top_p, sampling, memory
    )
    example = task.load(None, 1, seed)[0]
    system = ((session.manifest or {}).get("prompt") or {}).get("system")
    problem = Problem(0, example, to_messages(example, "", system))
    result = play_batch(session.model, task, opts.play, [problem], gen)[0]
    result.update(seed=example.meta["seed"], task_options=options)
    if opts.json:
        print(json.dumps(result, ensure_ascii=False))  # not rich: no wrapping, no markup
    else:
        print_episode(console, result)
    return result


def make_notes(as_json: bool, console: Console) -> Console:
    return make_console(stderr=True) if as_json else console  # stdout stays pure JSON


def marked_text(text: str, style: str | None = None) -> Text:
    """``text`` with its ``⟨mem K⟩`` markers dim cyan."""
    out = Text(text, style=style or "")
    out.highlight_regex(MARKERS, "dim cyan")
    return out


def print_episode(console: Console, rec: dict) -> None:
    """The transcript turn by turn, then the outcome."""
    ep = rec["episode"]
    console.print(
        Text(
            f"{rec['task']} · game {rec['id']} (seed {rec['seed']}) · memory {rec['mode']}", "bold"
        )
    )
    first = ep.get("first", 0)
    game, before = rec["transcript"][first:], rec["transcript"][:first]
    users = [m["content"] for m in game if m["role"] == "user"]
    replies = [m["content"] for m in game if m["role"] == "assistant"]
    system = [m["content"] for m in before if m["role"] == "system"]
    if system:
        console.print(Text("system: ", "bold") + Text(system[0]))
    shown = [m for m in before if m["role"] != "system"]
    if shown:
        console.print(Text(f"({len(shown) // 2} example turns before the game)", "dim"))
    for turn, (seen, reply, action) in enumerate(
        zip(users[: len(replies)], replies, ep["actions"], strict=True)
    ):
        console.rule(f"turn {turn + 1}", style="dim")
        console.print(Text("game:   ", "bold") + Text(seen))
        console.print(Text("agent:  ", "bold green") + marked_text(reply))
        named = Text(action, "green") if action is not None else Text("invalid", "red")
        console.print(Text("action: ", "bold") + named)
    if len(users) > len(replies):  # the game's answer to the last action
        console.rule("end", style="dim")
        console.print(Text("game:   ", "bold") + Text(users[-1]))
    outcome = "won" if ep["won"] else "lost" if rec["finished"] else "lost (turn limit)"
    console.print(
        Text(
            f"\n{outcome} · {ep['turns']} turn{'s' * (ep['turns'] != 1)} · {ep['invalid']} "
            f"invalid action{'s' * (ep['invalid'] != 1)} · {ep['weaves']} weave"
            f"{'s' * (ep['weaves'] != 1)} · memory {rec['mode']}",
            style="bold",
        )
    )
