"""The multi-turn episode engine: a batch of episodes on a scripted environment, with the KV
caches kept across turns, equals one episode at a time with everything recomputed."""

from __future__ import annotations

import doctest

import pytest
import torch

from conftest import make_memgen, make_model
from memgen_cli.config import GenerationConfig
from memgen_cli.data.environment import Observation
from memgen_cli.errors import MemgenError
from memgen_cli.generation import episodes
from memgen_cli.generation.episode_reference import reference_play
from memgen_cli.generation.episodes import (
    EpisodeConfig,
    next_tokens,
    parse_action,
    play,
    turn_break,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted:
    """A deterministic environment: episode ``seed`` lasts ``length`` turns (it is won if the
    last action is valid); a valid action earns 1, an invalid one 0 and the answer "invalid".
    The admissible commands are two thirds of the characters up to U+024F, changing each turn,
    so a tiny random model's first character is sometimes one of them and sometimes not."""

    def __init__(self, seed: int, length: int):
        self.seed, self.length, self.turn = seed, length, 0
        self.played: list[str | None] = []

    def commands(self) -> list[str]:
        chars = [chr(c) for c in range(33, 0x250) if (c + self.seed + self.turn) % 3]
        return chars + ["\ufffd"] * ((self.seed + self.turn) % 2)  # undecodable bytes too

    def reset(self) -> Observation:
        self.turn, self.played = 0, []
        return Observation(f"Game {self.seed}. You are in room 0.", self.commands())

    def step(self, action: str | None) -> Observation:
        assert action is None or action in self.commands()
        self.turn += 1
        self.played.append(action)
        done = self.turn >= self.length
        text = "invalid" if action is None else f"Room {self.turn}, after {action}."
        won = done and action is not None
        return Observation(text, self.commands(), float(action is not None), done, won)

    def close(self) -> None:
        pass


# Episodes of 2, 5 and 3 turns end at different turns; the fourth runs into the turn limit.
LENGTHS = [(0, 2), (1, 5), (2, 3), (3, 9)]
MAX_TURNS = 6


def scripted() -> list[Scripted]:
    return [Scripted(seed, length) for seed, length in LENGTHS]


def _with_frequent_eos(mg):
    """Make a byte the tiny model often writes its EOS, so some replies stop early (stopping
    only: no logits change) and others run to max_new_tokens."""
    probe = play(mg, scripted(), GenerationConfig(max_new_tokens=8, memory="off"))
    counts = torch.bincount(
        torch.tensor([t for ep in probe for reply in ep.replies for t in reply[1:]])
    )
    mg.tokenizer.eos_token = mg.tokenizer.convert_ids_to_tokens(int(counts.argmax()))
    return mg


def _trained_trigger(mg):
    with torch.no_grad():
        mg.trigger.trained.fill_(True)
        mg.trigger.head[2].bias.fill_(0.0)  # probabilities around 0.5: rows decide differently
    return mg


def _same(fast, slow):
    key = lambda i: (i.token_index, i.kind)  # noqa: E731
    for a, b in zip(fast, slow, strict=True):
        assert a.replies == b.replies and a.actions == b.actions  # identical greedy actions
        assert (a.rewards, a.won, a.done, a.finished) == (b.rewards, b.won, b.done, b.finished)
        assert a.messages == b.messages
        assert [[key(i) for i in t] for t in a.insertions] == [
            sorted(map(key, t)) for t in b.insertions
        ]
        assert [sorted((s.token_index, round(s.trigger_prob, 4)) for s in t) for t in a.skips] == [
            sorted((s.token_index, round(s.trigger_prob, 4)) for s in t) for t in b.skips
        ]
        for turn_a, turn_b in zip(a.insertions, b.insertions, strict=True):
            for x, y in zip(sorted(turn_a, key=key), sorted(turn_b, key=key), strict=True):
                torch.testing.assert_close(x.latents, y.latents, atol=1e-4, rtol=0)


# The episode scenarios: (make_memgen's settings, memory mode, keep_latents). The engine plays
# each here; test_episode_grpo scores each.
CASES = {
    "off": (dict(kind="llama"), "off", True),
    "weaver-keep": (dict(kind="llama"), "weaver", True),
    "weaver-drop": (dict(kind="llama"), "weaver", False),
    "qwen2-keep": (dict(kind="qwen2"), "weaver", True),
    "other-weaver-drop": (dict(kind="llama", weaver_kind="qwen2"), "weaver", False),
    "kv-keep": (dict(kind="llama", inject="kv"), "weaver", True),
    "kv-drop": (dict(kind="llama", inject="kv"), "weaver", False),
    "full-keep": (dict(kind="llama"), "full", True),
    "cache-keep": (dict(kind="llama", weaver_reads="cache", kv_prefix=True), "weaver", True),
    "cache-drop": (dict(kind="qwen2", weaver_reads="cache"), "weaver", False),
    "kv-cache-drop": (dict(kind="llama", inject="kv", weaver_reads="cache"), "weaver", False),
}


def case_model(case: str):
    """(model, memory mode, keep_latents) of ``CASES[case]``: a model that ends some replies
    early (``_with_frequent_eos``), with a trained trigger for memory full."""
    build, memory, keep = CASES[case]
    mg = _with_frequent_eos(make_memgen(**build))
    if memory == "full":
        _trained_trigger(mg)
    return mg, memory, keep


@pytest.mark.parametrize("case", list(CASES))
def test_batched_episodes_equal_one_at_a_time(case):
    mg, memory, keep = case_model(case)
    cfg = GenerationConfig(max_new_tokens=8, memory=memory)
    setting = EpisodeConfig(max_turns=MAX_TURNS, keep_latents=keep)
    envs = scripted()
    fast = play(mg, envs, cfg, setting)
    _same(fast, reference_play(mg, scripted(), cfg, setting))
    # what the scenario must contain for the comparison to mean something
    assert [ep.turns for ep in fast] == [2, 5, 3, MAX_TURNS]
    assert [ep.done for ep in fast] == [True, True, True, False]
    assert [env.played for env in envs] == [ep.actions for ep in fast]
    actions = [a for ep in fast for a in ep.actions]
    assert None in actions and any(a is not None for a in actions)
    assert sum(ep.invalid for ep in fast) == actions.count(None)
    assert [ep.rewards for ep in fast] == [
        [float(a is not None) for a in ep.actions] for ep in fast
    ]
    stops = [f for ep in fast for f in ep.finished]
    assert any(stops) and not all(stops)  # replies of different lengths in one turn
    assert len(fast[0].messages) == 1 + 2 * fast[0].turns  # the last answer ends the transcript
    if memory == "off":
        assert all(ep.weaves == 0 for ep in fast)
    elif memory == "weaver":  # every turn begins with prompt latents
        assert all(t and t[0].kind == "prompt" for ep in fast for t in ep.insertions)
        assert any(i.kind == "inference" for ep in fast for t in ep.insertions for i in t)
    else:  # the trigger decides once per turn where the turn begins: some weave, some skip
        starts = [any(i.kind == "prompt" for i in t) for ep in fast for t in ep.insertions]
        assert any(starts) and not all(starts)
        assert sum(not s for s in starts) == sum(
            s.token_index == 0 for ep in fast for t in ep.skips for s in t
        )


def test_keeping_latents_across_turns_changes_later_turns():
    mg = make_memgen("llama")
    cfg = GenerationConfig(max_new_tokens=8, memory="weaver")
    kept, dropped = (
        play(mg, scripted(), cfg, EpisodeConfig(MAX_TURNS, keep_latents=keep)) for keep in (1, 0)
    )
    assert [ep.replies[0] for ep in kept] == [ep.replies[0] for ep in dropped]  # turn 1 alike
    assert [ep.replies for ep in kept] != [ep.replies for ep in dropped]


def test_memory_off_replies_equal_hf_generate_on_the_history():
    """The plain reasoner through the engine is the plain model: each turn's reply is what
    Hugging Face's generate gives on the whole conversation so far."""
    mg = make_memgen("llama")
    plain, tok = make_model("llama")
    cfg = GenerationConfig(max_new_tokens=6, memory="off")
    played = play(mg, scripted(), cfg, EpisodeConfig(max_turns=4))
    for ep in played:
        history = tok.apply_chat_template(ep.messages[:1], add_generation_prompt=True)["input_ids"]
        for turn, reply in enumerate(ep.replies):
            ids = torch.tensor([history])
            hf = plain.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=-1)
            assert reply == hf[0, len(history) :].tolist()
            messages = ep.messages[: 1 + 2 * turn]
            history += reply + next_tokens(tok, messages, ep.messages[2 + 2 * turn]["content"])


def _counted(fn, widths: list[int]):
    """``fn`` that records the width of its first argument (B, T, D) in ``widths``."""

    def counted(inputs, *args, **kwargs):
        widths.append(inputs.shape[1])
        return fn(inputs, *args, **kwargs)

    return counted


def test_a_turn_runs_only_its_new_tokens(monkeypatch):
    """After the first prompt, no reasoner pass is longer than one turn's new tokens (the end
    of the reply, the turn break, the observation), and no weaver pass reads more than what
    came since its last: the history is never re-read."""
    for memory, keep in (("off", True), ("weaver", True), ("weaver", False)):
        mg = make_memgen("llama")
        reasoner, weaver = [], []
        hidden, weaver_pass = mg.reasoner_hidden, mg._weaver_pass

        monkeypatch.setattr(mg, "reasoner_hidden", _counted(hidden, reasoner))
        monkeypatch.setattr(mg, "_weaver_pass", _counted(weaver_pass, weaver))
        cfg = GenerationConfig(max_new_tokens=8, memory=memory)
        played = play(mg, scripted(), cfg, EpisodeConfig(keep_latents=keep))
        breaks = [
            len(
                next_tokens(
                    mg.tokenizer, ep.messages[: 1 + 2 * t], ep.messages[2 + 2 * t]["content"]
                )
            )
            for ep in played
            for t in range(ep.turns - 1)
        ]
        # the reply's last token, when it did not stop at EOS; rewound: the whole reply again
        chunk = max(breaks) + (1 if keep else 8)
        k = max(mg.weaver.num_latents("prompt"), mg.weaver.num_latents("inference"))
        assert reasoner[0] > chunk and max(reasoner[1:]) <= chunk  # decode 1, latents k, chunks
        assert sum(w > k for w in reasoner[1:]) == max(ep.turns for ep in played) - 1  # one a turn
        if memory == "weaver":  # at most a reply, its latents and a chunk, plus the K queries
            latents = (1 + mg.cfg.max_inference_insertions) * k
            assert weaver[0] == reasoner[0] + k and max(weaver[1:]) <= 8 + chunk + latents + k


def test_sampled_episodes_are_seeded():
    mg = make_memgen("llama")
    cfg = GenerationConfig(max_new_tokens=8, memory="weaver", temperature=1.0, seed=3)
    setting = EpisodeConfig(max_turns=3)
    one, two = (play(mg, scripted(), cfg, setting) for _ in range(2))
    assert [ep.replies for ep in one] == [ep.replies for ep in two]
    other = play(mg, scripted(), GenerationConfig(**{**cfg.__dict__, "seed": 4}), setting)
    assert [ep.replies for ep in one] != [ep.replies for ep in other]


def test_rewinding_is_refused_on_a_sliding_window_model(monkeypatch):
    monkeypatch.setattr(episodes, "reusable", lambda config: False)
    mg = make_memgen("qwen2")
    with pytest.raises(MemgenError, match="sliding-window"):
        play(mg, scripted(), GenerationConfig(max_new_tokens=2), EpisodeConfig(keep_latents=False))
    play(mg, scripted()[:1], GenerationConfig(max_new_tokens=2), EpisodeConfig(max_turns=2))


def test_parse_action():
    assert doctest.testmod(episodes).failed == 0
    commands = ["go north", "go", "take coin", "look"]
    assert parse_action("  `Take coin`!\n", commands) == "take coin"
    assert parse_action("\n\n> look\n", commands) == "look"
    assert parse_action("GO NORTH, then east", commands) == "go north"
    assert parse_action("go  north.", commands) == "go north"
    assert parse_action("looking", commands) is None
    assert parse_action("I go north", commands) is None  # the line must start with it


def test_turn_break_comes_from_the_chat_template(tokenizer):
    messages = [{"role": "user", "content": "start"}]
    assert turn_break(tokenizer, messages, "next") == (
        "<|im_end|>\n<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n"
    )
    tokenizer.chat_template = "{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(MemgenError, match="renders earlier turns differently"):
        turn_break(tokenizer, messages, "next")
