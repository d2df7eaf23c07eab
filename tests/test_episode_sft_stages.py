"""sft-weaver and baseline sft on TextWorld games (expert episodes): the tiny recipe trains and
writes its artifacts, memory.keep_latents goes into the manifest and comes back to eval, the
games trained on are training games only, and bad settings are one message each."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from helpers import BASELINE_ARTIFACT_FILES, WEAVER_ARTIFACT_FILES, invoke
from memgen_cli.artifacts import load_artifact
from memgen_cli.config import GenerationConfig
from memgen_cli.evaluation import episodes as eval_episodes
from memgen_cli.evaluation.plan import Problem
from memgen_cli.stages import baseline, sft_weaver
from memgen_cli.training.episode_data import expert_samples
from memgen_cli.training.sft_run import load_examples
from stage_runs import finished_run, losses

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(find_spec("textworld") is None, reason="textworld is not installed"),
]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "textworld" / "sft-weaver.yaml"


def config(stage, tiny_base, tmp_path, *sets):
    return stage.resolve_config(RECIPE, list(sets), base=str(tiny_base), output=tmp_path / "out")


def test_training_games_are_never_held_out_games(cached, tiny_base, tokenizer, tmp_path):
    cfg = config(sft_weaver, tiny_base, tmp_path)
    task, train, held, _ = load_examples(cfg)
    samples, dropped = expert_samples(task, tokenizer, train + held, None, 4096)
    assert dropped == 0 and [s.game for s in samples] == [e.id for e in train + held]
    seeds = {e.meta["seed"] for e in train + held}
    assert seeds == {1, 2, 3}
    games = task.load("test", 2)  # what eval plays
    assert not seeds & {g.meta["seed"] for g in games}
    routes = {tuple(e.meta["walkthrough"]) for e in train + held}
    assert not routes & {tuple(g.meta["walkthrough"]) for g in games}
    for s, game in zip(samples, train + held, strict=True):  # a turn per expert command
        assert len(s.turns) == len(s.spans) == min(len(game.meta["walkthrough"]), 3)


def test_sft_weaver_trains_on_episodes_and_eval_reads_keep_latents(
    cached, tiny_base, tmp_path, monkeypatch
):
    cfg = config(sft_weaver, tiny_base, tmp_path, "memory.keep_latents=false")
    out, manifest, _ = finished_run(sft_weaver, cfg, WEAVER_ARTIFACT_FILES)
    s = manifest["training"]
    assert (s["samples"], s["heldout_samples"], s["steps"]) == (2, 1, 2)
    assert s["samples_per_rank"] == [4]  # episodes (2 steps of 2), not their turns' rows
    assert manifest["memory"]["keep_latents"] is False
    assert set(s["heldout_loss"]) == {"weaver_initial", "memory_off", "weaver_final"}
    assert all(v > 0 for v in s["heldout_loss"].values())
    assert len(losses(out)) == 2 and all(v > 0 for v in losses(out))

    model, _, _ = load_artifact(out, device="cpu")
    assert model.cfg.keep_latents is False
    seen, real = [], eval_episodes.play

    def play(model, envs, gen, setting, system=None):
        seen.append(setting)
        return real(model, envs, gen, setting, system)

    monkeypatch.setattr(eval_episodes, "play", play)
    task, _, held, _ = load_examples(cfg)
    problem = Problem(0, held[0], [{"role": "user", "content": held[0].question}])
    eval_episodes.play_batch(model, task, "x", [problem], GenerationConfig(max_new_tokens=3))
    assert [(e.keep_latents, e.max_turns) for e in seen] == [(False, 3)]

    # An artifact written before the key existed plays with latents kept.
    text = json.loads((out / "memgen.json").read_text())
    del text["memory"]["keep_latents"]
    (out / "memgen.json").write_text(json.dumps(text))
    assert load_artifact(out, device="cpu")[0].cfg.keep_latents is True


def test_baseline_sft_trains_a_lora_on_the_same_episodes(cached, tiny_base, tmp_path):
    cfg = config(baseline, tiny_base, tmp_path)
    out, manifest, _ = finished_run(baseline, cfg, BASELINE_ARTIFACT_FILES)
    s = manifest["training"]
    assert (s["samples"], s["heldout_samples"], s["steps"]) == (2, 1, 2)
    assert set(s["heldout_loss"]) == {"memory_off", "lora_final"}
    assert all(v > 0 for v in s["heldout_loss"].values())


@pytest.mark.parametrize(
    "command, extra, message",
    [
        (["sft-weaver"], ["--set", "data.prompt_suffix=Go."], "prompt_suffix must be empty"),
        (["sft-weaver"], ["--task-option", "exclude_train=1"], "exclude_train=3"),
        (["baseline", "sft"], ["--method", "prompt"], "method prompt cannot play games"),
    ],
)
def test_bad_settings_are_one_message(cached, tiny_base, tmp_path, command, extra, message):
    args = [*command, "--recipe", RECIPE, "--base", tiny_base, "--output", tmp_path / "o"]
    result = invoke(*args, *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
