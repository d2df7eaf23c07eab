"""Every YAML under recipes/ loads into its stage's config class (unknown keys are errors), and
every weaver recipe drives its LoRA baseline as it stands.

A recipe file is named ``<stage>.yaml`` (``recipes/<model>/<task>/<stage>.yaml``). A stage that
adds recipes adds its config class to ``RECIPE_CONFIGS`` below.
"""

import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

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


def test_trigger_recipes_pass_the_stages_checks(tiny_weaver, tmp_path):
    """Every train-trigger recipe passes the stage's up-front checks (G, batch, penalty, ...)."""
    from memgen_cli.stages import train_trigger

    _, art = tiny_weaver
    paths = sorted(RECIPES.rglob("train-trigger.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_recipe(TriggerConfig, path, [f"artifact={art}", f"output={tmp_path / 'o'}"])
        manifest, point = train_trigger.validate(cfg, None)
        assert point is None and manifest["kind"] == "weaver", path


# ------------------------------------------------------------------ a weaver recipe drives its baseline
# weaver stage -> its baseline's stage (recipe and artifact name)
BASELINES = {"sft-weaver": "baseline-sft", "grpo-weaver": "baseline-grpo"}
WEAVERS = [p for p in ALL if p.stem in BASELINES]
PAIRS = [(p, p.with_name(f"{BASELINES[p.stem]}.yaml")) for p in WEAVERS]
PAIRS = [pair for pair in PAIRS if pair[1].is_file()]
# Read by the weaver stage only (config.py: BaselineConfig, BaselineGRPOConfig): they place latents.
WEAVER_ONLY_TRAINING = {
    "sft-weaver": ("schedule", "prompt_insertion"),
    "grpo-weaver": ("memory", "log_completions_steps"),
}


def baseline_stage(weaver_stage: str):
    from memgen_cli.stages import baseline, baseline_grpo

    return baseline if weaver_stage == "sft-weaver" else baseline_grpo


def ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


@pytest.mark.parametrize("path", WEAVERS, ids=ids(WEAVERS))
def test_a_weaver_recipe_loads_as_its_baselines_config(path, tmp_path):
    """Resolved by the baseline command (no training): the weaver's model, memory, data,
    training (and reward) sections as they are; the baseline's artifacts beside the weaver's."""
    weaver = load_recipe(RECIPE_CONFIGS[path.stem], path)
    stage = baseline_stage(path.stem)
    cfg = stage.resolve_config(path)
    assert (cfg.model, cfg.memory, cfg.data) == (weaver.model, weaver.memory, weaver.data)
    assert dataclasses.asdict(cfg.training) == dataclasses.asdict(weaver.training)
    assert cfg.output == str(Path(weaver.output).parent / BASELINES[path.stem])
    if path.stem == "grpo-weaver":
        assert cfg.reward == weaver.reward
        sft = None if weaver.init is None else str(Path(weaver.init).parent / "baseline-sft")
        assert cfg.init == sft
    # ... and passes the baseline stage's own up-front checks.
    sets = [f"output={tmp_path / 'out'}"] + (["init=null"] if path.stem == "grpo-weaver" else [])
    checked = stage.resolve_config(path, sets)
    assert checked.output == str(tmp_path / "out")
    point = stage.validate(checked, None)
    assert point in (None, (None, None)), path


@pytest.mark.parametrize("weaver_path,baseline_path", PAIRS, ids=ids(p for p, _ in PAIRS))
def test_a_weaver_recipe_and_the_baseline_recipe_beside_it_agree(weaver_path, baseline_path):
    """What the weaver's recipe says and its baseline reads is what the baseline recipe says: the
    same run, from either file. ``lora`` is the baseline recipe's own section; of ``memory`` the
    baseline reads the trainable-parameter budget only."""
    from conftest import make_model

    stage = baseline_stage(weaver_path.stem)
    mine, theirs = stage.resolve_config(weaver_path), stage.resolve_config(baseline_path)
    unread = {k: getattr(type(mine.training)(), k) for k in WEAVER_ONLY_TRAINING[weaver_path.stem]}
    model, _ = make_model("llama")
    budget = [stage_budget(model, cfg.memory) for cfg in (mine, theirs)]
    assert budget[0] == budget[1], (weaver_path, budget)

    def read(cfg):
        return dataclasses.replace(
            cfg, lora=None, memory=None, training=dataclasses.replace(cfg.training, **unread)
        )

    assert read(mine) == read(theirs)


def stage_budget(model, memory) -> int:
    from memgen_cli.stages.baseline import weaver_trainable_params

    return weaver_trainable_params(model, memory)


def test_the_old_section_name_still_reads_and_both_names_are_an_error(tmp_path, capsys):
    old = tmp_path / "baseline-sft.yaml"
    old.write_text("weaver:\n  prompt_latents: 3\n")
    assert load_recipe(BaselineConfig, old).memory.prompt_latents == 3
    assert 'section "weaver" is now called "memory"' in " ".join(capsys.readouterr().err.split())
    both = tmp_path / "baseline-grpo.yaml"
    both.write_text("weaver:\n  prompt_latents: 3\nmemory:\n  prompt_latents: 4\n")
    with pytest.raises(MemgenError, match='"weaver" and "memory" are one section'):
        load_recipe(BaselineGRPOConfig, both)


def test_the_users_output_and_init_are_never_mapped(tmp_path):
    from memgen_cli.stages import baseline, baseline_grpo

    sft = RECIPES / "tiny" / "sft-weaver.yaml"
    grpo = RECIPES / "smollm2-135m" / "basic_arithmetic" / "grpo-weaver.yaml"
    assert baseline.resolve_config(sft, ["output=runs/mine"]).output == "runs/mine"
    assert baseline.resolve_config(sft, output=tmp_path / "x").output == str(tmp_path / "x")
    cfg = baseline_grpo.resolve_config(grpo, ["init=runs/lora", "output=runs/rl"])
    assert (cfg.init, cfg.output) == ("runs/lora", "runs/rl")
    assert baseline_grpo.resolve_config(grpo, ["init=null"]).init is None
    assert baseline_grpo.resolve_config(grpo, init=tmp_path / "i").init == str(tmp_path / "i")


def test_baseline_sft_runs_the_demos_weaver_recipe(monkeypatch):
    """The command that used to stop at 'Unknown config key "memory"' now reaches the stage."""
    from memgen_cli.cli import app
    from memgen_cli.stages import baseline

    seen = {}
    monkeypatch.setattr(baseline, "run", lambda cfg, **kwargs: seen.setdefault("cfg", cfg))
    recipe = RECIPES / "smollm2-135m" / "basic_arithmetic" / "demo" / "sft-weaver.yaml"
    result = CliRunner().invoke(app, ["baseline", "sft", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].output == "runs/demo/baseline-sft"
    assert seen["cfg"].memory == load_recipe(SFTConfig, recipe).memory


GAME_RECIPES = [
    p
    for p in ALL
    if p.stem in ("sft-weaver", "grpo-weaver")
    and load_recipe(RECIPE_CONFIGS[p.stem], p).data.task.startswith("textworld:")
]


@pytest.mark.parametrize("path", GAME_RECIPES, ids=ids(GAME_RECIPES))
def test_game_recipes_pass_the_episode_data_checks(path):
    """Each recipe on games (the embedded model's, Qwen2.5-1.5B's) builds its task and passes the
    stages' up-front data checks (empty prompt_suffix, exclude_train covering the games)."""
    pytest.importorskip("textworld")
    from memgen_cli.data import get_task
    from memgen_cli.training.episode_data import check_episode_data

    data = load_recipe(RECIPE_CONFIGS[path.stem], path).data
    task = get_task(data.task, **data.options)
    check_episode_data(task, data, data.size + data.heldout)


def test_qwen_has_game_recipes_beside_its_gsm8k_ones():
    qwen = {str(p.relative_to(RECIPES / "qwen2.5-1.5b")) for p in GAME_RECIPES if "qwen" in str(p)}
    assert qwen == {
        "textworld/coin_collector/sft-weaver.yaml",
        "textworld/coin_collector/grpo-weaver.yaml",
    }
