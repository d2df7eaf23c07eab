"""Every YAML under recipes/ loads into its stage's config class (unknown keys are errors).

A recipe file is named ``<stage>.yaml`` (``recipes/<model>/<task>/<stage>.yaml``). A stage that
adds recipes adds its config class to ``RECIPE_CONFIGS`` below.
"""

from pathlib import Path

import pytest
import yaml

from memgen_cli.config import (
    BaselineConfig,
    BaselineGRPOConfig,
    GRPOConfig,
    SFTConfig,
    TriggerConfig,
    dump_yaml,
    from_dict,
    load_recipe,
)
from memgen_cli.errors import MemgenError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_CONFIGS: dict[str, type] = {
    "sft-weaver": SFTConfig,
    "baseline-sft": BaselineConfig,
    "baseline-grpo": BaselineGRPOConfig,
    "grpo-weaver": GRPOConfig,
    "train-trigger": TriggerConfig,
}
ALL = sorted(RECIPES.rglob("*.yaml"))


def test_there_are_recipes():
    assert ALL, f"no recipes under {RECIPES}"


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_recipe_loads(path):
    stage = path.stem
    assert stage in RECIPE_CONFIGS, (
        f"{path}: no config class registered for stage {stage!r} in RECIPE_CONFIGS"
    )
    cfg = load_recipe(RECIPE_CONFIGS[stage], path)

    assert from_dict(type(cfg), yaml.safe_load(dump_yaml(cfg))) == cfg  # round-trips


def test_unknown_recipe_key_is_an_error_with_a_suggestion(tmp_path):
    bad = tmp_path / "sft-weaver.yaml"
    bad.write_text("memory:\n  promt_latents: 4\n")
    with pytest.raises(
        MemgenError,
        match='Unknown config key "memory.promt_latents". Did you mean "prompt_latents"',
    ):
        load_recipe(SFTConfig, bad)


@pytest.mark.parametrize("path", [p for p in ALL if "gsm8k" in p.parts], ids=str)
def test_gsm8k_recipes_train_on_gsm8k_train(path):
    """gsm_symbolic's templates come from GSM8K test: a GSM8K recipe must train on GSM8K train."""
    data = load_recipe(RECIPE_CONFIGS[path.stem], path).data
    assert (data.task, data.split) == ("gsm8k", "train"), path
    assert data.path is None or "test" not in Path(data.path).name, path


def test_grpo_recipes_divide_their_batches_into_groups(tmp_path):
    """Every GRPO recipe passes the stage's own up-front checks (batch divisible by G, ...)."""
    from memgen_cli.stages import grpo_weaver

    for path in RECIPES.rglob("grpo-weaver.yaml"):
        cfg = load_recipe(GRPOConfig, path, ["init=null", f"output={tmp_path / 'out'}"])
        assert grpo_weaver.validate(cfg, None) is None, path


def test_baseline_grpo_recipes_pass_the_stages_checks(tmp_path):
    """Every baseline-grpo recipe passes the stage's up-front checks (G, batch, rewards, ...)."""
    from memgen_cli.stages import baseline_grpo

    paths = sorted(RECIPES.rglob("baseline-grpo.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = load_recipe(BaselineGRPOConfig, path, ["init=null", f"output={tmp_path / 'out'}"])
        assert baseline_grpo.validate(cfg, None) == (None, None), path


def test_trigger_recipes_pass_the_stages_checks(tmp_path):
    """Every train-trigger recipe passes the stage's up-front checks (G, batch, penalty, ...)."""
    from helpers import tiny_artifact
    from memgen_cli.stages import train_trigger

    _, art = tiny_artifact(tmp_path)
    paths = sorted(RECIPES.rglob("train-trigger.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_recipe(TriggerConfig, path, [f"artifact={art}", f"output={tmp_path / 'o'}"])
        manifest, point = train_trigger.validate(cfg, None)
        assert point is None and manifest["kind"] == "weaver", path
