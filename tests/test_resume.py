"""`--resume` in every training stage: one rule for what may change, and resumed runs that
record what uninterrupted ones record.

The rule itself (``sft_run.resume_point``) is tested on a recorded checkpoint folder; then
each stage trains a 2-layer Llama (``--base DIR``) on a small GSM8K-format JSONL with its tiny
recipe: straight to 5 steps, and interrupted by Ctrl-C in a 4-step run, refused when resumed
with a setting that changes the result, and resumed to 5 steps (``training.max_steps`` may
change). Both artifacts must match except in ``sft_run.EXECUTION_FIELDS``.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import files, tiny_artifact
from memgen_cli.artifacts import read_manifest
from memgen_cli.config import MemoryConfig, from_dict, to_dict
from memgen_cli.errors import MemgenError
from memgen_cli.stages import baseline, baseline_grpo, grpo_weaver, sft_weaver, train_trigger
from memgen_cli.training import sft_run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "tiny"
HELD = ["data.heldout=2"]  # so that the scores taken before training are in the manifest


@dataclasses.dataclass
class Stage:
    module: object
    recipe: str
    sets: list[str]  # on top of the tiny recipe
    changed: str  # a setting that changes the result, refused on resume
    refusal: str  # how the refusal names it


STAGES = {
    "sft-weaver": Stage(
        sft_weaver,
        "sft-weaver",
        HELD,
        "training.learning_rate=0.002",
        "training.learning_rate: 0.001 (checkpoint) vs 0.002 (now)",
    ),
    "grpo-weaver": Stage(
        grpo_weaver,
        "grpo-weaver",
        HELD,
        "training.num_generations=2",
        "training.num_generations: 4 (checkpoint) vs 2 (now)",
    ),
    "train-trigger": Stage(
        train_trigger,
        "train-trigger",
        [],
        "training.seed=1",
        "training.seed: 0 (checkpoint) vs 1 (now)",
    ),
    "baseline-sft": Stage(
        baseline,
        "baseline-sft",
        HELD,
        "training.batch_size=3",
        "training.batch_size: 2 (checkpoint) vs 3 (now)",
    ),
    "baseline-grpo": Stage(
        baseline_grpo,
        "baseline-grpo",
        HELD,
        "training.temperature=0.7",
        "training.temperature: 1.0 (checkpoint) vs 0.7 (now)",
    ),
}

# tiny: conftest's (base dir, a weaver artifact on it, a data file of 12 problems).
pytestmark = pytest.mark.usefixtures("one_thread")


def config(stage: Stage, tiny, out: Path, *sets):
    base, art, data = tiny
    flags = {"artifact": art} if stage.module is train_trigger else {}
    return stage.module.resolve_config(
        RECIPES / f"{stage.recipe}.yaml",
        [*stage.sets, *sets],
        base=str(base),
        data=str(data),
        output=out,
        **flags,
    )


def ctrl_c_at(stage: Stage, step: int) -> list:
    """A callback that sends Ctrl-C at the end of ``step``, in the form the stage takes."""
    if stage.module is train_trigger:

        def at_step(done, metrics):
            if done == step:
                signal.raise_signal(signal.SIGINT)

        return [at_step]

    class AtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                signal.raise_signal(signal.SIGINT)

    return [AtStep()]


def without(manifest: dict, fields) -> dict:
    """The manifest less the dotted ``fields`` (those about the run's execution)."""
    out = json.loads(json.dumps(manifest))
    for path in fields:
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    return out


# ------------------------------------------------------------------------------ the rule
def record_run(ckpts: Path, cfg) -> Path:
    """A checkpoint folder as a stage leaves it: the recorded run and one checkpoint."""
    sft_run.begin_checkpoints(ckpts, cfg, None, {"weaver_initial": 0.5})
    point = ckpts / "checkpoint-2"
    point.mkdir()
    (point / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return point


def test_the_rule_names_every_changed_key_and_lets_the_allowed_ones_change(
    tiny, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process, as recorded
    stage = STAGES["sft-weaver"]
    cfg = config(stage, tiny, tmp_path / "out")
    ckpts = sft_weaver.checkpoint_dir(cfg)
    point = record_run(ckpts, cfg)

    allowed = ["training.max_steps=9", "training.save_steps=1", "training.logging_steps=2"]
    later = config(stage, tiny, tmp_path / "elsewhere", *allowed, "training.report_to=none")
    assert sft_run.resume_point(ckpts, "auto", to_dict(later)) == point
    assert sft_run.resume_point(ckpts, str(point), to_dict(later)) == point
    assert sft_run.begin_checkpoints(ckpts, later, point, {}) == {"weaver_initial": 0.5}

    changed = config(stage, tiny, tmp_path / "out", "training.seed=7", "memory.delimiters=[',']")
    unread = ("training.seed", "memory")  # keys or sections a stage does not read
    assert sft_run.resume_point(ckpts, "auto", to_dict(changed), unread) == point
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MemgenError) as refused:
        sft_run.resume_point(ckpts, "auto", to_dict(changed))
    text = str(refused.value)
    assert "training.seed: 0 (checkpoint) vs 7 (now)" in text
    assert 'memory.delimiters: [",", ".", "\\n"] (checkpoint) vs [","] (now)' in text
    assert "processes: 1 (checkpoint) vs 2 (now)" in text
    assert text.count("(checkpoint)") == 3  # nothing else is named
    assert f"delete {ckpts} to start over" in text and "and as many processes" in text


def test_grpo_weaver_with_init_compares_the_artifact_memory_and_the_init(tiny, tmp_path):
    """With --init the artifact's memory is trained, whatever the recipe's memory section says;
    another --init is another run."""
    stage = STAGES["grpo-weaver"]
    _, art, _ = tiny
    cfg = config(stage, tiny, tmp_path / "out", "memory.prompt_latents=7")
    cfg = dataclasses.replace(cfg, init=str(art))
    ran = dataclasses.replace(cfg, memory=from_dict(MemoryConfig, read_manifest(art)["memory"]))
    point = record_run(grpo_weaver.checkpoint_dir(cfg), ran)  # as run() records it

    assert grpo_weaver.validate(cfg, "auto") == point
    _, other = tiny_artifact(tmp_path / "other", lora_r=2)
    with pytest.raises(MemgenError) as refused:
        grpo_weaver.validate(dataclasses.replace(cfg, init=str(other)), "auto")
    text = str(refused.value)
    assert f'init: "{art}" (checkpoint) vs "{other}" (now)' in text
    assert "memory.lora_r: 4 (checkpoint) vs 2 (now)" in text  # the artifacts' memory differs


@pytest.mark.parametrize("name", ["baseline-sft", "baseline-grpo"])
def test_a_baseline_resumes_past_what_only_the_weaver_reads(name, tiny, tmp_path):
    stage = STAGES[name]
    cfg = config(stage, tiny, tmp_path / "out")
    point = record_run(stage.module.checkpoint_dir(cfg), cfg)
    weaver_only = ["memory.delimiters=[',']", "memory.max_inference_insertions=1"]
    weaver_only += ["training.schedule=all" if name == "baseline-sft" else "training.memory=full"]
    got = stage.module.validate(config(stage, tiny, tmp_path / "out", *weaver_only), "auto")
    assert got in (point, (point, None))  # baseline grpo: (point, init's manifest)
    with pytest.raises(MemgenError, match="memory.lora_r: 4 .checkpoint. vs 2 .now."):
        stage.module.validate(config(stage, tiny, tmp_path / "out", "memory.lora_r=2"), "auto")


# ---------------------------------------------------------------------------- the stages
@pytest.mark.parametrize("name", list(STAGES))
def test_a_resumed_run_records_what_an_uninterrupted_one_does(name, tiny, tmp_path):
    stage = STAGES[name]
    straight = stage.module.run(config(stage, tiny, tmp_path / "a", "training.max_steps=5"))

    cfg = config(stage, tiny, tmp_path / "b", "training.max_steps=4")
    with pytest.raises(stage.module.TrainingInterrupted) as stop:
        stage.module.run(cfg, callbacks=ctrl_c_at(stage, 2))
    ckpts = stage.module.checkpoint_dir(cfg)
    assert stop.value.checkpoint.parent == ckpts

    changed = config(stage, tiny, tmp_path / "b", "training.max_steps=4", stage.changed)
    with pytest.raises(MemgenError) as refused:
        stage.module.run(changed, resume="auto")
    assert stage.refusal in str(refused.value) and str(ckpts) in str(refused.value)
    assert not Path(cfg.output).exists() and list(ckpts.glob("checkpoint-*"))

    # max_steps may change: the run goes on to 5 steps, as the straight one did
    resumed = stage.module.run(
        config(stage, tiny, tmp_path / "b", "training.max_steps=5"), resume="auto"
    )
    a, b = (json.loads((out / "memgen.json").read_text()) for out in (straight, resumed))
    assert b["training"]["resumed_from"] == str(stop.value.checkpoint)
    assert without(a, sft_run.EXECUTION_FIELDS) == without(b, sft_run.EXECUTION_FIELDS)
    assert files(straight) == files(resumed)  # completions logged alike, too
    assert (straight / "recipe.yaml").read_text().replace(str(tmp_path / "a"), "") == (
        resumed / "recipe.yaml"
    ).read_text().replace(str(tmp_path / "b"), "")


def test_grpo_resumed_between_the_steps_of_one_generation_is_the_uninterrupted_run(tiny, tmp_path):
    """With ``num_iterations: 2`` a Ctrl-C after step 3 leaves a checkpoint inside a generation
    (steps 3 and 4 train on step 3's rollouts): it holds them, and the resumed run trains on
    them, so it ends where the uninterrupted one does, to the last bit of every tensor."""
    stage = STAGES["grpo-weaver"]
    # A reward that differs within every group, so every step moves the weaver (the task's
    # own is 0 for every completion of the tiny model, and nothing would move).
    sets = ["training.num_iterations=2", "reward.functions=[test_grpo:even_token_reward]"]
    straight = stage.module.run(config(stage, tiny, tmp_path / "a", "training.max_steps=5", *sets))
    cfg = config(stage, tiny, tmp_path / "b", "training.max_steps=5", *sets)
    with pytest.raises(stage.module.TrainingInterrupted) as stop:  # the step after it ends
        stage.module.run(cfg, callbacks=ctrl_c_at(stage, 2))
    assert stop.value.checkpoint.name == "checkpoint-3"
    assert (stop.value.checkpoint / "rollouts-0.pt").is_file()
    resumed = stage.module.run(cfg, resume="auto")
    a, b = (load_file(out / "weaver.safetensors") for out in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifests = (json.loads((out / "memgen.json").read_text()) for out in (straight, resumed))
    assert without(next(manifests), sft_run.EXECUTION_FIELDS) == without(
        next(manifests), sft_run.EXECUTION_FIELDS
    )


def test_sft_weaver_logs_at_every_checkpoint_and_takes_a_new_logging_interval(tiny, tmp_path):
    """No step's loss is lost at a checkpoint (mean_loss is the run's), and the resumed
    Trainer logs at the recipe's interval, not the checkpoint's."""
    stage, sets = STAGES["sft-weaver"], ["training.max_steps=6", "training.save_steps=10"]
    straight = sft_weaver.run(config(stage, tiny, tmp_path / "a", *sets))
    cfg = config(stage, tiny, tmp_path / "b", *sets, "training.logging_steps=2")
    with pytest.raises(sft_weaver.TrainingInterrupted) as stop:
        sft_weaver.run(cfg, callbacks=ctrl_c_at(stage, 2))
    assert stop.value.checkpoint.name == "checkpoint-3"  # between two logs
    resumed = sft_weaver.run(config(stage, tiny, tmp_path / "b", *sets), resume="auto")

    rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4, 5, 6]
    a, b = (json.loads((o / "memgen.json").read_text())["training"] for o in (straight, resumed))
    assert b["mean_loss"] == pytest.approx(a["mean_loss"], rel=1e-6)
    assert b["final_loss"] == a["final_loss"]


@pytest.mark.parametrize("name", list(STAGES))
def test_resume_auto_with_nothing_to_resume_keeps_a_finished_artifact(name, tiny, tmp_path):
    # A run that ended leaves no checkpoint: `--resume auto` run again (as the guides' "continue
    # after Ctrl-C" line after a run that finished) would start from scratch and replace it.
    stage = STAGES[name]
    cfg = config(stage, tiny, tmp_path / "out", "training.max_steps=1")
    finished = stage.module.run(cfg)
    before = {p: p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()}
    with pytest.raises(MemgenError) as refused:
        stage.module.run(cfg, resume="auto")
    message = str(refused.value)
    assert "no checkpoint" in message and "--overwrite" in message and str(cfg.output) in message
    assert {p: p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()} == before
    assert not stage.module.checkpoint_dir(cfg).exists()
    again = stage.module.run(cfg, resume="auto", overwrite=True)  # said so: trained again
    assert (again / "memgen.json").is_file()
