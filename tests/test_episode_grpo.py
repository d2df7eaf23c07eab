"""GRPO on episodes: the scoring forward sees the context each episode saw (its log-probs of
the sampled tokens equal the engine's, with latents kept across turns or not), rewards of
played episodes, and ``memgen grpo-weaver`` on a TextWorld game end to end."""

from __future__ import annotations

import doctest
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_episodes import CASES, MAX_TURNS, case_model, scripted
from typer.testing import CliRunner

from conftest import make_memgen
from helpers import WEAVER_ARTIFACT_FILES as ARTIFACT_FILES
from helpers import Capture, files, rows
from memgen_cli.cli import app
from memgen_cli.config import GenerationConfig
from memgen_cli.data import episode_rewards
from memgen_cli.generation.episodes import EpisodeConfig, play
from memgen_cli.stages import grpo_weaver as stage
from memgen_cli.training.episode_rollouts import EpisodeRollouts, episode_inputs, episode_logprobs
from stage_runs import game_run_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
needs_textworld = pytest.mark.skipif(
    find_spec("textworld") is None,
    reason="textworld is not installed: `make setup` installs it (pip install -e '.[agents]')",
)


def _played(mg, keep: bool, memory: str = "weaver", seed: int = 3):
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=seed, memory=memory)
    setting = EpisodeConfig(max_turns=MAX_TURNS, keep_latents=keep)
    return play(mg, scripted(), cfg, setting, keep_logprobs=True)


@pytest.mark.parametrize("case", list(CASES))
def test_scoring_forward_logprobs_equal_the_engines(case):
    """The important one: one teacher-forced forward over each episode (or each turn, with
    keep_latents false) gives the log-prob the engine sampled each agent token with."""
    mg, memory, keep = case_model(case)  # some replies stop early, others are cut
    played = _played(mg, keep, memory)
    # what the scenario must contain for the comparison to mean something
    stops = [s for ep in played for s in ep.stops]
    assert None in stops and any(s is not None for s in stops)
    assert mg.tokenizer.eos_token_id not in {t for ep in played for b in ep.breaks for t in b[:1]}
    if memory != "off":
        kinds = {i.kind for ep in played for t in ep.insertions for i in t}
        assert kinds == {"prompt", "inference"}

    batch, grids = episode_inputs(played, keep, mg.tokenizer.pad_token_id)
    rows = len(played) if keep else sum(ep.turns for ep in played)
    assert batch.input_ids.shape[0] == rows
    with torch.no_grad():
        logps, entropy = episode_logprobs(mg, batch, temperature=1.0)
    real = grids["completion_mask"].bool()
    counts = [
        sum(len(r) + (s is not None) for r, s in zip(ep.replies, ep.stops, strict=True))
        for ep in played
    ]
    assert real.sum(1).tolist() == counts
    gap = (logps - grids["sampling_logps"]).abs()[real]
    assert float(gap.max()) < 1e-4, float(gap.max())
    assert float(logps[~real].abs().max()) == 0.0 and bool((entropy[real] > 0).all())
    cut = [s is None for ep in played for r, s in zip(ep.replies, ep.stops, strict=True) for _ in r]
    assert grids["truncated"][real].sum() == sum(cut)


def test_latents_of_earlier_turns_matter_to_the_scores():
    """Scoring a keep_latents=true episode as if each turn saw only its own latents gives other
    log-probs after the first turn: the two layouts differ where they should."""
    mg = make_memgen("llama")
    played = _played(mg, keep=True)
    kept, _ = episode_inputs(played, True, mg.tokenizer.pad_token_id)
    dropped, grids = episode_inputs(played, False, mg.tokenizer.pad_token_id)
    with torch.no_grad():
        a, _ = episode_logprobs(mg, kept)
        b, _ = episode_logprobs(mg, dropped)
    first = len(played[1].replies[0]) + (played[1].stops[0] is not None)
    torch.testing.assert_close(a[1, :first], b[1, :first], atol=1e-4, rtol=0)  # turn 1 alike
    assert float((a - b).abs()[grids["completion_mask"].bool()].max()) > 1e-3


def test_selected_rows_score_as_in_the_whole_batch():
    """The loss scores only the episodes with a non-zero advantage (``select``): their
    log-probs, and the gradient through them, are those of the whole batch's rows."""
    mg = make_memgen("llama")
    mg.set_trainable(weaver=True, trigger=False)
    played = _played(mg, keep=False)
    batch, _ = episode_inputs(played, False, mg.tokenizer.pad_token_id)
    whole, _ = episode_logprobs(mg, batch)
    part, _ = episode_logprobs(mg, batch.select([1, 3]))
    torch.testing.assert_close(part, whole[[1, 3]], atol=1e-5, rtol=0)
    part.sum().backward()
    grads = [p.grad for p in mg.weaver_parameters().values() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_rollout_views_and_rewards_of_played_episodes():
    mg = make_memgen("llama")
    played = _played(mg, keep=True)
    roll = EpisodeRollouts(2, played, True)
    assert [len(c) for c in roll.completion_ids] == [
        sum(len(r) + (s is not None) for r, s in zip(ep.replies, ep.stops, strict=True))
        for ep in played
    ]
    assert roll.finished == [all(ep.finished) for ep in played]
    columns = episode_rewards.episode_columns(played)
    assert columns["won"] == [ep.won for ep in played] and columns["turns"] == [2, 5, 3, 6]
    assert episode_rewards.won([], [], **columns) == [float(ep.won) for ep in played]
    assert episode_rewards.invalid_actions([], [], **columns) == [-ep.invalid for ep in played]
    failures, _ = doctest.testmod(episode_rewards)
    assert failures == 0


# --------------------------------------------------------------------- the stage on games
TINY_GAMES = (
    Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "textworld" / "grpo-weaver.yaml"
)
GAME_METRICS = {
    "reward",
    "reward_std",
    "rewards/won/mean",
    "rewards/invalid_actions/mean",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/clipped_ratio",
    "entropy",
    "logp_diff/mean",
    "logp_diff/max",
    "episodes/won",
    "episodes/turns",
    "episodes/invalid_rate",
    "episodes/weaves",
}


def even_token_reward(prompts, completions, completion_ids, **columns):
    """The share of even token ids the agent wrote: it differs between a group's episodes
    (a tiny random model never wins, so ``won`` alone teaches nothing)."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def game_cfg(tiny_base, out: Path, *sets: str):
    return stage.resolve_config(
        TINY_GAMES,
        [*sets, "training.log_completions_steps=1"],
        base=str(tiny_base),
        rewards=["test_episode_grpo:even_token_reward"],
        reward_weights=[1.0],
        output=out,
    )


@needs_textworld
@pytest.mark.parametrize("keep", [True, False])
def test_grpo_weaver_on_textworld_games_writes_an_artifact(cached, tiny_base, tmp_path, keep):
    sets = [f"memory.keep_latents={str(keep).lower()}", "data.heldout=1"]
    cfg = game_cfg(tiny_base, tmp_path / "out", *sets)
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    assert files(out) == ARTIFACT_FILES | {
        "completions/step_00001.jsonl",
        "completions/step_00002.jsonl",
    }
    manifest = game_run_manifest(out, "grpo-weaver", keep)
    s = manifest["training"]
    assert s["rewards"] == ["won", "invalid_actions", "even_token_reward"]
    assert set(s["heldout_accuracy"]) == {"weaver_initial", "weaver_final", "memory_off"}
    assert manifest["memory"]["keep_latents"] is keep
    logs = [r for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in logs] == [1, 2]
    for r in logs:
        assert GAME_METRICS <= set(r), GAME_METRICS - set(r)
        assert r["logp_diff/max"] < 1e-4  # the scoring forward saw what the episodes saw
        assert r["rewards/won/mean"] == 0.0 and r["episodes/turns"] == 3.0  # nobody wins
        assert r["episodes/weaves"] >= 3  # prompt latents at every turn's start
        # the reward: won, minus 0.02 per invalid action, plus the plug-in
        assert r["reward"] == pytest.approx(
            r["rewards/won/mean"]
            + 0.02 * r["rewards/invalid_actions/mean"]
            + r["rewards/even_token_reward/mean"],
            abs=1e-6,
        )
    shown = rows(out / "completions" / "step_00001.jsonl")
    assert len(shown) == 4 and {r["id"] for r in shown} == {
        "coin_collector-level5-1", "coin_collector-level5-2",
    }  # fmt: skip
    for r in shown:
        assert r["turns"] == 3 and len(r["actions"]) == 3 and r["won"] is False
        replies = [m["content"] for m in r["completion"] if m["role"] == "assistant"]
        assert len(replies) == 3 and all(x.startswith("⟨mem 2⟩") for x in replies)
    advantages = [r["advantage"] for r in shown]
    assert abs(advantages[0] + advantages[1]) < 1e-3 and any(a != 0 for a in advantages)
    trained = capture.model.memgen
    changed = [
        n for n, p in trained.weaver_parameters().items()
        if not torch.equal(p.detach().cpu(), capture.initial[n].cpu())
    ]  # fmt: skip
    assert changed


@needs_textworld
def test_kl_and_reused_episodes_on_games(cached, tiny_base, tmp_path):
    """beta > 0 scores every episode under the starting weaver too (the first step's KL is 0),
    and num_iterations 2 trains twice on one generation of episodes, its old log-probs the
    sampling ones (fp32, no dropout)."""
    sets = ["training.beta=0.05", "training.num_iterations=2", "memory.keep_latents=false"]
    out = stage.run(game_cfg(tiny_base, tmp_path / "out", *sets))
    logs = [r for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in logs] == [1, 2] and logs[0]["kl"] == 0.0 and logs[1]["kl"] >= 0
    assert logs[0]["reward"] == logs[1]["reward"]  # the same episodes, logged with both steps
    assert "logp_diff/max" in logs[0] and "logp_diff/max" not in logs[1]
    assert files(out) == ARTIFACT_FILES | {"completions/step_00001.jsonl"}


@needs_textworld
def test_resume_on_games_gives_the_same_weights(cached, tiny_base, tmp_path):
    sets = ["training.max_steps=3"]
    straight = stage.run(game_cfg(tiny_base, tmp_path / "a", *sets))
    cfg = game_cfg(tiny_base, tmp_path / "b", *sets)
    with pytest.raises(stage.TrainingInterrupted):
        stage.run(cfg, callbacks=[Capture(interrupt_at=1)])
    resumed = stage.run(cfg, resume="auto")
    for name in ("weaver.safetensors", "weaver/adapter_model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [r for r in rows(resumed / "metrics.jsonl") if "reward" in r]
    same = [r for r in rows(straight / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert [r["reward"] for r in logs] == [r["reward"] for r in same]


@needs_textworld
@pytest.mark.parametrize(
    "sets,message",
    [
        (["data.prompt_suffix=Think."], "data.prompt_suffix must be empty"),
        (["data.options.exclude_train=1"], "exclude_train (1) must be at least the 2 games"),
    ],
    ids=["prompt-suffix", "exclude-train"],
)
def test_grpo_weaver_on_games_refuses_bad_data_before_any_model(
    cached, tiny_base, tmp_path, sets, message
):
    out = tmp_path / "out"
    args = ["grpo-weaver", "--recipe", str(TINY_GAMES), "--base", str(tiny_base)]
    args += [a for s in sets for a in ("--set", s)] + ["--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text and text.count("error:") == 1 and "Traceback" not in result.output
    assert (
        not out.exists()
        and not stage.checkpoint_dir(stage.resolve_config(TINY_GAMES, output=out)).exists()
    )
