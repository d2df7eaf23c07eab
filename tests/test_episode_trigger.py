"""Trigger RL on episodes: one sampled decision where each turn begins. The decisions' states
and log-probs that play records are those a teacher-forced forward over the episode gives
(latents of earlier turns kept or not), and ``memgen train-trigger`` on TextWorld games writes
the artifact, moves the head, logs the weave rate per turn, and ``memgen eval --memory full``
plays games with the trained trigger."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_episodes import MAX_TURNS, _with_frequent_eos, scripted
from test_train_trigger import ARTIFACT_FILES, WEAVER_FILES

from conftest import make_memgen
from helpers import files, invoke, rows
from memgen_cli.config import GenerationConfig
from memgen_cli.generation.episodes import EpisodeConfig, play
from memgen_cli.models.training import Points, weave_hidden
from memgen_cli.training.episode_trigger import episode_metrics, turn_decisions
from memgen_cli.training.trigger_rl import (
    TURN_START,
    DecisionSampler,
    TriggerRollouts,
    decision_batch,
    decision_logprobs,
)
from stage_runs import game_run_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
needs_textworld = pytest.mark.skipif(
    find_spec("textworld") is None,
    reason="textworld is not installed: `make setup` installs it (pip install -e '.[agents]')",
)
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "textworld" / "train-trigger.yaml"


def _sampling_trigger(mg):
    """A trained head whose probability depends on the state (its last layer kept random),
    centred near 0.5 so that the rows decide differently."""
    with torch.no_grad():
        mg.trigger.trained.fill_(True)
        mg.trigger.head[2].weight.mul_(20.0)
        mg.trigger.head[2].bias.fill_(0.0)
    return mg


def _decision_columns(ep, keep: bool):
    """The episode's columns as the engine read them (the first prompt, then per turn the
    reply and what was fed after it), and per decision: its column (the token whose state the
    head read) and the latent points visible there (earlier turns' only if ``keep``)."""
    ids, starts = list(ep.prompt_ids), []
    for t in range(ep.turns):
        starts.append(len(ids))
        ids += ep.replies[t] + (ep.breaks[t] if t < len(ep.breaks) else [])
    points = []  # (turn, kind, column after which the latents went)
    for t, turn in enumerate(ep.insertions):
        for i in turn:
            if i.inserted:
                col = starts[t] - 1 if i.kind == "prompt" else starts[t] + i.token_index - 1
                points.append((t, i.kind, col))
    return ids, starts, points


def _recomputed(mg, ep, decisions, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decision's state from a teacher-forced forward (one per decision, up to the
    decision's token, with only the latents woven before it), and the head's log-prob of the
    choice recorded."""
    ids, starts, points = _decision_columns(ep, keep)
    states = []
    for turn, d in turn_decisions(decisions):
        col = starts[turn] - 1 if d.token == TURN_START else starts[turn] + d.token_index - 1
        seen = [(k, c) for t, k, c in points if c < col and (keep or t == turn)]
        prompt = [c for k, c in seen if k == "prompt"]
        inference = [c for k, c in seen if k == "inference"]
        row = torch.tensor([ids[: col + 1]])
        hidden = weave_hidden(mg, row, torch.ones_like(row), Points([prompt], [inference]))
        states.append(hidden[0, col])
    states = torch.stack(states)
    actions = torch.tensor([float(d.invoke) for d in decisions])
    logps, _ = decision_logprobs(mg.trigger, states, actions)
    return states, logps


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "drop"])
def test_recorded_decisions_equal_a_teacher_forced_forward(keep):
    """The important one: the state each turn's decision read, and the log-prob of the choice
    taken, are those of a forward over the episode as it was played (within float error); the
    training loss re-applies the head to exactly these states."""
    mg = _sampling_trigger(_with_frequent_eos(make_memgen("llama", max_inference_insertions=1)))
    sampler = DecisionSampler(mg.trigger, seed=5)
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3, memory="full")
    played = play(mg, scripted(), cfg, EpisodeConfig(MAX_TURNS, keep), decide=sampler)
    turns_seen = kinds = 0
    with torch.no_grad():
        for r, ep in enumerate(played):
            decisions = sampler.decisions[r]
            starts = [d for d in decisions if d.token == TURN_START]
            assert len(starts) == ep.turns  # one decision where each turn begins
            # the engine wove prompt latents exactly where the sampler said INVOKE
            woven = [any(i.kind == "prompt" for i in turn) for turn in ep.insertions]
            assert woven == [d.invoke for d in starts]
            states, logps = _recomputed(mg, ep, decisions, keep)
            assert torch.allclose(states, torch.stack(sampler.states[r]), atol=1e-4)
            recorded = torch.tensor([d.logp for d in decisions])
            assert torch.allclose(logps, recorded, atol=1e-4), (logps, recorded)
            turns_seen += ep.turns
            kinds |= sum(d.token != TURN_START for d in decisions) > 0
    assert turns_seen >= 8 and kinds  # clause boundaries were decisions too
    invoked = [d.invoke for r in sampler.decisions.values() for d in r if d.token == TURN_START]
    assert any(invoked) and not all(invoked)  # sampled: some turns weave, some skip
    # the loss's batch holds every decision with its sampling log-prob
    roll = TriggerRollouts(
        2,
        [[]] * len(played),
        [True] * len(played),
        [sampler.decisions[r] for r in range(len(played))],
        [torch.stack(sampler.states[r]) for r in range(len(played))],
        episodes=played,
    )
    b = decision_batch(roll)
    now, _ = decision_logprobs(mg.trigger, b["states"], b["actions"])
    assert torch.allclose(now * b["mask"], b["old_logps"], atol=1e-5)
    m = episode_metrics(roll, MAX_TURNS)
    first = [sampler.decisions[r][0].invoke for r in range(len(played))]
    assert m["episodes/weave_rate_by_turn"][0] == pytest.approx(sum(first) / len(first), abs=1e-4)
    assert m["episodes/turn_weave_rate"] == pytest.approx(sum(invoked) / len(invoked))
    assert len(m["episodes/weave_rate_by_turn"]) == MAX_TURNS


@needs_textworld
def test_train_trigger_on_games_then_eval_full(cached, tiny_weaver, tmp_path):
    base, art = tiny_weaver
    out = tmp_path / "out"
    result = invoke(
        "train-trigger", "--recipe", TINY, "--artifact", art, "--base", base, "--output", out,
        "--set", "training.learning_rate=0.05",
        # the games eval plays below (held-out seeds, none excluded): made once, not twice
        "--set", "data.seed=1000000",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 games from textworld:coin_collector" in " ".join(result.output.split())
    assert files(out) == ARTIFACT_FILES
    for name in WEAVER_FILES:  # the weaver is frozen: bit-identical tensors
        a, b = load_file(art / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = load_file(out / "trigger.safetensors")
    assert head["head.2.weight"].abs().sum() > 0  # init_head zeroed it: the update moved it
    assert bool(head["trained"])
    game_run_manifest(out, "train-trigger")
    logged = rows(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert r["episodes/won"] == 0.0 and r["episodes/turns"] == 3.0  # nobody wins
        assert r["task_reward"] == 0.0 and r["penalty"] > 0  # the penalty alone moves the head
        assert len(r["episodes/weave_rate_by_turn"]) == 3
        assert 0 < r["episodes/turn_weave_rate"] < 1
        assert r["decisions_per_completion"] >= 3  # a decision at each of the 3 turns
    shown = rows(out / "completions" / "step_00001.jsonl")
    assert len(shown) == 4 and {r["group"] for r in shown} == {0, 1}
    for r in shown:
        starts = [d for d in r["decisions"] if d["token"] is None]
        assert [d["turn"] for d in starts] == [1, 2, 3] and r["turns"] == 3
        replies = [m["content"] for m in r["completion"] if m["role"] == "assistant"]
        assert [x.startswith("⟨mem") for x in replies] == [d["invoke"] for d in starts]
        if not any(d["invoke"] for d in r["decisions"]):
            assert r["penalty"] == 0.0  # Eq. 9 charges invocations only
    # the trained trigger drives memgen eval's memory full on games
    ev = tmp_path / "eval"
    result = invoke(
        "eval", "--artifact", out, "--data", "textworld:coin_collector", "--memory", "full",
        "--limit", "2", "--max-new-tokens", "4", "--output", ev,
        "--task-option", "max_turns=3", "--task-option", "exclude_train=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads((ev / "metrics.json").read_text())["results"]
    assert row["mode"] == "full" and row["n"] == 2 and row["mean_steps"] == 3.0
    assert 0 <= row["weaves_per_episode"] <= 3 + 3  # at most a turn start and a boundary a turn
    records = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    probs = [i["trigger_prob"] for rec in records for i in rec["insertions"]]
    assert all(p is None or 0 < p < 1 for p in probs)
