"""SFT on expert episodes: the rendered episode is the engine's stream, the loss is on the
agent's tokens only, and the training forward's log-probabilities of those tokens equal the
slow reference's when it reads the episode turn by turn, with latents kept or not."""

from __future__ import annotations

import doctest

import pytest
import torch

from conftest import make_memgen
from memgen_cli.data.environment import EnvironmentTask, Observation
from memgen_cli.errors import MemgenError
from memgen_cli.generation.episode_reference import _stream
from memgen_cli.models import training
from memgen_cli.models.training import IGNORE, Points, weave_forward
from memgen_cli.training.episode_data import (
    EpisodeCollator,
    expert_episode,
    expert_samples,
    render,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Corridor:
    """A game of ``length`` rooms in a row: the expert goes east until the last room, then
    takes the coin; observations and commands differ by room."""

    def __init__(self, length: int):
        self.length, self.room = length, 0

    def commands(self) -> list[str]:
        return ["go east", "go west", "look", f"examine door {self.room}", "take coin"]

    def plan(self) -> list[str]:
        return ["go east"] * (self.length - 1 - self.room) + ["take coin"]

    def reset(self) -> Observation:
        self.room = 0
        return Observation("Find the coin. You are in a hall.", self.commands(), expert=self.plan())

    def step(self, action: str | None) -> Observation:
        won = action == "take coin"
        self.room += action == "go east"
        text = "You take the coin." if won else f"Room {self.room}, with a door, east, to go on."
        return Observation(text, self.commands(), float(won), won, won, self.plan())

    def close(self) -> None:
        pass


class Corridors(EnvironmentTask):
    name = "corridors"
    max_turns = 6

    def environment(self, example):
        return Corridor(int(example.meta["length"]))


def _examples(lengths):
    from memgen_cli.data import Example

    return [Example(f"c{n}", "", "", meta={"length": n}) for n in lengths]


def test_doctests():
    assert doctest.testmod(training).failed == 0


def test_rendered_episode_is_the_conversation_the_engine_plays(tokenizer):
    ep = expert_episode(Corridor(3), max_turns=6, system="Play.")
    assert ep.actions == ["go east", "go east", "take coin"] and ep.won
    ids, turns, spans = render(tokenizer, ep)
    # The whole conversation through the chat template, up to the last reply's EOS.
    text = tokenizer.apply_chat_template(ep.messages[:-1], tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"][:-1]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert [ids[p - len(header) + 1 : p + 1] for p in turns] == [header] * 3
    eos = tokenizer.eos_token_id
    assert [tokenizer.decode(ids[s : e - 1]) for s, e in spans] == ep.actions
    assert [ids[e - 1] for _, e in spans] == [eos] * 3


def test_expert_turn_limit_and_a_missing_expert():
    assert expert_episode(Corridor(9), max_turns=4).actions == ["go east"] * 4

    class NoPlan(Corridor):
        def plan(self):
            return ["fly"]

    with pytest.raises(MemgenError, match="no admissible command at turn 1"):
        expert_episode(NoPlan(3), max_turns=4)


@pytest.mark.parametrize("keep", [True, False])
def test_labels_cover_only_the_agents_tokens_and_every_turn_weaves(tokenizer, keep):
    samples, dropped = expert_samples(Corridors(), tokenizer, _examples([3, 2]), None, 4096)
    assert dropped == 0 and [s.game for s in samples] == ["c3", "c2"]
    batch = EpisodeCollator(tokenizer.pad_token_id, keep_latents=keep)(samples)
    labels, ids = batch["labels"], batch["input_ids"]
    want = []  # per row: its length, and the indices of the agent's tokens in it
    for s in samples:
        turns = [list(range(b, e)) for b, e in s.spans]
        if keep:
            want.append((len(s.input_ids), [i for turn in turns for i in turn]))
        else:  # one row per turn, up to its stop token: only that turn's tokens
            want += [(e, turn) for turn, (_, e) in zip(turns, s.spans, strict=True)]
    assert len(want) == len(ids) == (2 if keep else 5)
    for row, (n, agent) in enumerate(want):
        mask = torch.zeros(ids.shape[1], dtype=torch.bool)
        mask[agent] = True
        assert (labels[row][mask] == ids[row][mask]).all()
        assert (labels[row][~mask] == IGNORE).all() and batch["attention_mask"][row].sum() == n
    agent = tokenizer.decode(labels[labels != IGNORE])
    assert "Room" not in agent and "user" not in agent and "Find" not in agent
    # one prompt point per assistant turn, at the token before it
    points = batch["prompt_points"]
    if keep:
        assert points == [s.turns for s in samples] and [len(p) for p in points] == [3, 2]
    else:
        assert points == [[p] for s in samples for p in s.turns]


def _teacher_forced(mg, sample, keep: bool, cap: int) -> dict[int, float]:
    """Log-probability of every agent token when the slow reference streams read the episode
    as the engine plays it: prompt latents as each turn begins, inference latents after the
    first ``cap`` clause boundaries of each reply; with ``keep`` false a fresh stream from the
    text history at every turn (``reference_play``'s way)."""
    ids, out, stream, fed = sample.input_ids, {}, None, 0
    for point, (start, end) in zip(sample.turns, sample.spans, strict=True):
        if stream is None or not keep:
            stream = _stream(mg, ids[: point + 1])
        else:
            for token in ids[fed : point + 1]:  # the stop token, turn break, observation
                stream.append(token)
        stream.weave("prompt")
        left = cap
        for i in range(start, end):
            logits = mg.lm_head(stream.hidden())[0].float()
            out[i] = float(torch.log_softmax(logits, -1)[ids[i]])
            if i == end - 1:
                break  # the stop token is fed with what follows the reply
            stream.append(ids[i])
            if mg.delimiters[ids[i]] and left > 0:
                left -= 1
                stream.weave("inference")
        fed = end - 1
    return out


CASES = {
    "keep": (dict(kind="llama"), True),
    "drop": (dict(kind="llama"), False),
    "qwen2-keep": (dict(kind="qwen2"), True),
    "other-weaver-drop": (dict(kind="llama", weaver_kind="qwen2"), False),
    "kv-keep": (dict(kind="llama", inject="kv"), True),
    "kv-drop": (dict(kind="llama", inject="kv"), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_forward_equals_the_episode_read_turn_by_turn(case):
    build, keep = CASES[case]
    cap = 2
    mg = make_memgen(**build, max_inference_insertions=cap)
    samples, _ = expert_samples(
        Corridors(), mg.tokenizer, _examples([3, 2]), None, 4096, mg.delimiters.cpu()
    )
    collate = EpisodeCollator(mg.tokenizer.pad_token_id, "first", cap, keep_latents=keep)
    batch = collate(samples)
    points = Points(batch["prompt_points"], batch["inference_points"])
    with torch.no_grad():
        out = weave_forward(mg, batch["input_ids"], batch["attention_mask"], batch["labels"],
                            points, return_logits=True)  # fmt: skip
    logp = torch.log_softmax(out.logits.float(), -1)
    rows = iter(range(len(batch["input_ids"])))
    weaves = 0
    for s in samples:
        with torch.no_grad():
            want = _teacher_forced(mg, s, keep, cap)
        got = {}
        for spans in [s.spans] if keep else [[span] for span in s.spans]:
            row = next(rows)
            for start, end in spans:
                for i in range(start, end):
                    got[i] = float(logp[row, i - 1, s.input_ids[i]])
        assert got.keys() == want.keys()
        torch.testing.assert_close(
            torch.tensor(list(got.values())), torch.tensor(list(want.values())), atol=1e-4, rtol=0
        )
        weaves += sum(min(len(c), cap) for c in s.candidates)
    assert out.num_tokens == sum(e - b for s in samples for b, e in s.spans)
    assert weaves > 0  # inference latents inside replies too, not only at turn starts


def test_baseline_and_weaver_score_the_same_tokens_of_an_episode():
    """baseline sft's pairs (TRL's completion_mask) and sft-weaver's rows label the same
    tokens: with memory off both held-out losses are the plain model's on the agent's tokens."""
    from conftest import make_model
    from memgen_cli.stages import baseline
    from memgen_cli.training.episode_data import episode_pairs
    from memgen_cli.training.sft_data import heldout_loss

    mg = make_memgen("llama")
    plain, tok = make_model("llama")
    examples = _examples([3, 2, 4])
    pairs, _ = episode_pairs(tok, examples, "", None, 4096, task=Corridors())
    samples, _ = expert_samples(Corridors(), tok, examples, None, 4096, mg.delimiters.cpu())
    rows = baseline.as_dataset(pairs)
    assert rows["completion_mask"] == [s.completion_mask() for s in samples]
    lora = baseline.heldout_loss(plain, pairs, tok.pad_token_id, batch=2)
    weaver = heldout_loss(mg, samples, EpisodeCollator(tok.pad_token_id, memory=False), batch=2)
    assert abs(lora - weaver) < 1e-5
