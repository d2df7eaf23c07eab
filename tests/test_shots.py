"""Example turns before a game (``Observation.shots``, textworld's ``shots`` option): the engine
plays them as part of the opening, the same as the one-at-a-time reference; records, GRPO
prompts and SFT losses treat the game's first observation, not the example's, as where the
game begins."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
from test_episodes import LENGTHS, MAX_TURNS, Scripted, _same

from conftest import make_memgen
from memgen_cli.config import GenerationConfig
from memgen_cli.data.base import Example
from memgen_cli.data.environment import Observation
from memgen_cli.evaluation.episodes import marked_messages, record
from memgen_cli.evaluation.plan import Problem
from memgen_cli.generation.episode_reference import reference_play
from memgen_cli.generation.episodes import EpisodeConfig, play
from memgen_cli.training.episode_data import expert_episode, render
from memgen_cli.training.episode_grpo import split_episode

pytestmark = pytest.mark.usefixtures("one_thread")
needs_textworld = pytest.mark.skipif(
    find_spec("textworld") is None,
    reason="textworld is not installed: `make setup` installs it (pip install -e '.[agents]')",
)

SHOTS = [
    {"role": "user", "content": "Example game. You are in a hall."},
    {"role": "assistant", "content": "go north"},
    {"role": "user", "content": "You are in a den."},
    {"role": "assistant", "content": "take key"},
]


class WithShots(Scripted):
    """``Scripted`` whose reset shows ``SHOTS`` first, and whose expert plays the first
    admissible command each turn."""

    def reset(self) -> Observation:
        obs = super().reset()
        obs.shots = [dict(m) for m in SHOTS]
        obs.expert = obs.commands[:1]
        return obs

    def step(self, action):
        obs = super().step(action)
        obs.expert = obs.commands[:1]
        return obs


class NoShots(WithShots):
    """``WithShots`` without the example turns: the baseline for the span shift."""

    def reset(self) -> Observation:
        obs = super().reset()
        obs.shots = []
        return obs


def games() -> list[WithShots]:
    return [WithShots(seed, length) for seed, length in LENGTHS]


@pytest.mark.parametrize("keep", [True, False])
def test_example_turns_are_played_as_the_opening_the_same_as_the_reference(keep):
    mg = make_memgen("llama")
    cfg = GenerationConfig(max_new_tokens=6, memory="weaver")
    setting = EpisodeConfig(max_turns=MAX_TURNS, keep_latents=keep)
    fast = play(mg, games(), cfg, setting, system="Play well.")
    _same(fast, reference_play(mg, games(), cfg, setting, system="Play well."))
    for ep, (seed, _) in zip(fast, LENGTHS, strict=True):
        assert ep.messages[1:5] == SHOTS and ep.head == 6 and ep.first == 5
        assert ep.messages[ep.first]["content"] == f"Game {seed}. You are in room 0."
        assert ep.messages[ep.user_index(1)]["role"] == "user"
        assert ep.messages[ep.user_index(1) - 1]["role"] == "assistant"
        assert len(ep.messages) == ep.head + 2 * ep.turns
        # the example's replies are not the agent's: woven turns count the game's only
        assert len(ep.insertions) == ep.turns


def test_records_and_grpo_prompts_begin_the_game_after_the_examples():
    mg = make_memgen("llama")
    ep = play(mg, games()[:1], GenerationConfig(max_new_tokens=6, memory="weaver"))[0]
    marked = marked_messages(mg.tokenizer, ep)
    assert marked[:4] == SHOTS  # example replies untouched (no markers, not the agent's)
    assert [m["content"] for m in marked[5::2]] != [m["content"] for m in ep.messages[5::2]]
    problem = Problem(0, Example(id="g0", question="", answer=""), [])
    rec = record("textworld:test", "weaver", problem, ep, mg.tokenizer)
    assert rec["prompt"] == "Game 0. You are in room 0." and rec["episode"]["first"] == 4
    assert "go north" not in rec["completion"] and rec["completion"].count("\n") == ep.turns - 1
    prompt, completion = split_episode(ep)
    assert prompt == [*SHOTS, ep.messages[4]] and completion[0]["role"] == "assistant"


def test_sft_loss_spans_cover_the_game_replies_not_the_example_turns():
    mg = make_memgen("llama")
    tok = mg.tokenizer
    ep = expert_episode(WithShots(1, 5), MAX_TURNS)
    assert ep.head == 5 and ep.turns == 5
    ids, turns, spans = render(tok, ep)
    without = expert_episode(NoShots(1, 5), MAX_TURNS)
    ids0, _, spans0 = render(tok, without)
    shift = len(ids) - len(ids0)  # the example turns' tokens, all before the first span
    assert shift > 0 and spans == [[a + shift, b + shift] for a, b in spans0]
    for (a, b), action in zip(spans, ep.actions, strict=True):
        assert tok.decode(ids[a : b - 1]) == action
    opening = tok.decode(ids[: spans[0][0]])
    assert "go north" in opening and "take key" in opening  # in the prompt, never in a span


@needs_textworld
def test_textworld_shows_its_example_turns_formatted_as_its_own(cached):
    from memgen_cli.data import get_task
    from memgen_cli.data.textworld import EXAMPLE, INSTRUCTION

    task = get_task("textworld:coin_collector", level=5, objective="brief", shots=2,
                    exclude_train=0)  # fmt: skip
    game = task.load("test", 1)[0]
    env = task.environment(game)
    try:
        first = env.reset()
        later = env.step(first.commands[0])
    finally:
        env.close()
    assert [m["role"] for m in first.shots] == ["user", "assistant"] * 2
    assert first.shots[0]["content"].startswith(EXAMPLE[0][0])
    assert "Available commands: go north, inventory, look." in first.shots[0]["content"]
    assert first.shots[0]["content"].endswith(INSTRUCTION) and first.text.endswith(INSTRUCTION)
    assert [m["content"] for m in first.shots[1::2]] == ["go north", "take key"]
    assert later.shots == []


@needs_textworld
@pytest.mark.parametrize("shots", [-1, 3, "two"])
def test_a_bad_shots_option_names_the_range(shots):
    from memgen_cli.data import get_task
    from memgen_cli.errors import MemgenError

    with pytest.raises(MemgenError, match="shots must be 0-2"):
        get_task("textworld:coin_collector", shots=shots)
