"""`memgen sft-weaver`: tokenisation, schedule, training behaviour, artifact, resume, errors.

Fast tests train a 2-layer Llama saved to a temporary directory (``--base DIR``) on a small
GSM8K-format JSONL; the slow ones use the embedded SmolLM2 model and torchrun.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed
from typer.testing import CliRunner

from conftest import make_model
from helpers import WEAVER_ARTIFACT_FILES as ARTIFACT_FILES
from helpers import WORKED, Capture, files, plain_names, tiny_config, write_problems
from memgen_cli.artifacts import load_artifact
from memgen_cli.cli import app
from memgen_cli.config import MemoryConfig, SFTConfig, load_recipe
from memgen_cli.data import Example
from memgen_cli.generation import encode_prompts
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import IGNORE, Points, weave_forward
from memgen_cli.stages import sft_weaver as stage
from memgen_cli.training.sft_data import SFTCollator, encode_examples
from stage_runs import OVERFIT, command_run, finished_run, losses, train_on_two_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "sft-weaver.yaml"

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def tiny_cfg(tiny_base, tmp_path, *sets) -> SFTConfig:
    """The tiny recipe on 12 problems with worked answers (helpers.tiny_config)."""
    return tiny_config(stage, TINY, tiny_base, tmp_path, sets, 12, WORKED)


# ------------------------------------------------------------------------ data pieces
def test_labels_cover_only_the_answer_and_prompt_matches_generation():
    mg = make_memgen_default()
    ex = Example("1", "What is 2+3?", "5", "2+3=5.\nSo, 5.\n#### 5")
    (enc,), dropped = encode_examples(mg, [ex], "Be brief.", None, max_length=512)
    assert dropped == 0
    prompt = encode_prompts(
        mg.tokenizer, [[{"role": "user", "content": "What is 2+3?\nBe brief."}]], "cpu"
    )
    assert enc.input_ids[: enc.prompt_len] == prompt["input_ids"][0].tolist()  # same as generate
    batch = SFTCollator(mg.tokenizer.pad_token_id, "first", 5)([enc])
    labels = batch["labels"][0]
    assert (labels[: enc.prompt_len] == IGNORE).all()
    target = mg.tokenizer.decode(labels[enc.prompt_len :])
    assert target == ex.solution + mg.tokenizer.eos_token
    assert batch["prompt_points"] == [enc.prompt_len - 1]
    # Inference points are delimiters of the target, never the prompt and never the last token.
    pts = batch["inference_points"][0]
    assert pts and all(enc.prompt_len <= p < len(enc.input_ids) - 1 for p in pts)
    assert all(mg.tokenizer.decode([enc.input_ids[p]])[-1] in ",.\n" for p in pts)


def make_memgen_default():
    model, tok = make_model("llama")
    return MemGenModel(
        model, tok, MemoryConfig(lora_r=4, lora_alpha=8, prompt_latents=2, inference_latents=2)
    )


def test_too_long_samples_are_dropped_and_counted():
    mg = make_memgen_default()
    short = Example("1", "Hi?", "1", "1.")
    long = Example("2", "Hi?", "1", "word, " * 200)
    kept, dropped = encode_examples(mg, [short, long, short], "", None, max_length=100)
    assert dropped == 1 and len(kept) == 2
    assert [k.index for k in kept] == [0, 1]


def test_schedules():
    from memgen_cli.training.sft_data import Encoded

    item = Encoded(list(range(30)), 5, [6, 9, 12, 15, 18, 21], 0)
    first = SFTCollator(0, "first", 3)([item])["inference_points"][0]
    every = SFTCollator(0, "all", 3)([item])["inference_points"][0]
    rand = SFTCollator(0, "random", 3, seed=1)
    a = rand([item])["inference_points"][0]
    assert first == [6, 9, 12] and every == item.candidates
    assert len(a) == 3 and set(a) <= set(item.candidates) and a == sorted(a)
    assert rand([item])["inference_points"][0] == a  # same (seed, epoch, sample): same draw
    draws = set()
    for epoch in range(8):
        rand.epoch = epoch
        draws.add(tuple(rand([item])["inference_points"][0]))
    assert len(draws) > 1  # a new subset per epoch
    subsets = SFTCollator(0, "subsets", 3, seed=1)
    seen, sizes = set(), []
    for epoch in range(40):
        subsets.epoch = epoch
        pts = subsets([item])["inference_points"][0]
        assert set(pts) <= {6, 9, 12} and pts == sorted(pts)  # only among the first cap
        seen.add(tuple(pts))
        sizes.append(len(pts))
    assert len(seen) == 8  # every subset of the first three, the empty one included
    assert 1.0 < sum(sizes) / len(sizes) < 2.0  # each point kept with probability 1/2
    off = SFTCollator(0, memory=False)([item])
    assert off["prompt_points"] is None and off["inference_points"] == [[]]


def test_flags_map_onto_the_config(tmp_path):
    data = write_problems(tmp_path / "d.jsonl", 12, WORKED)
    cfg = stage.resolve_config(
        TINY, ["training.learning_rate=0.5"], base="b", data=str(data), output="o"
    )
    assert (cfg.model.base, cfg.data.task, cfg.data.path, cfg.output) == (
        "b",
        "gsm8k",
        str(data),
        "o",
    )
    assert cfg.training.learning_rate == 0.5
    cfg = stage.resolve_config(
        None, [], data=str(data), columns={"prompt": "question", "answer": "answer"}
    )
    assert cfg.data.task == "jsonl" and cfg.data.columns == {
        "prompt": "question",
        "answer": "answer",
    }
    assert stage.resolve_config(None, [], data="gym:chain_sum").data.task == "gym:chain_sum"
    options = {"config": {"min_terms": 2, "max_terms": 2}}
    merged = stage.resolve_config(
        None, ["data.options={steps: false}"], data="gym:chain_sum", task_options=options
    ).data.options
    assert merged == {"steps": False, **options}
    assert (
        stage.resolve_config(None, [], report_to="tensorboard").training.report_to == "tensorboard"
    )


# --------------------------------------------------------------------------- training
def test_training_lowers_loss_changes_every_weaver_tensor_and_not_the_reasoner(tiny_base, tmp_path):
    cfg = tiny_cfg(tiny_base, tmp_path, *OVERFIT, "data.heldout=0")
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    got = losses(out)
    assert len(got) == 6 and got[-1] < got[0] * 0.9, got

    set_seed(cfg.training.seed)  # the stage's seed, then the same construction: initial weights
    fresh = load_base(str(tiny_base), "cpu")
    initial = MemGenModel(fresh.model, fresh.tokenizer, cfg.memory)
    trained = capture.model.memgen
    before = initial.weaver_parameters()
    for name, p in trained.weaver_parameters().items():
        assert not torch.equal(p.detach(), before[name].detach()), f"{name} did not change"
    plain = load_base(str(tiny_base), "cpu").model.state_dict()
    reasoner = plain_names(trained.peft.state_dict())
    assert set(reasoner) == set(plain)
    for name, value in plain.items():
        assert torch.equal(reasoner[name], value), f"reasoner tensor {name} changed"


def test_artifact_file_set_reload_and_summary(tiny_base, tmp_path):
    cfg = tiny_cfg(tiny_base, tmp_path)
    out, manifest, capture = finished_run(stage, cfg, ARTIFACT_FILES)
    s = manifest["training"]
    assert (s["steps"], s["samples"], s["heldout_samples"], s["world_size"]) == (3, 6, 2, 1)
    assert s["samples_per_rank"] == [6] and s["dropped_too_long"] == 0
    assert s["task_options"] == {}
    assert set(s["heldout_loss"]) == {"weaver_initial", "memory_off", "weaver_final"}
    assert manifest["prompt"]["prompt_suffix"] == cfg.data.prompt_suffix
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

    trained = capture.model.memgen.eval()
    loaded, _, _ = load_artifact(out, device="cpu")
    collate = SFTCollator(
        trained.tokenizer.pad_token_id, "first", cfg.memory.max_inference_insertions
    )
    ex = [Example(str(i), f"What is {i}+1?", str(i + 1), f"{i}+1, so {i + 1}.") for i in range(3)]
    batch = collate(encode_examples(trained, ex, "", None, 512)[0])
    points = Points(batch["prompt_points"], batch["inference_points"])
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], points)
    a = weave_forward(trained, *args, return_logits=True).logits
    b = weave_forward(loaded, *args, return_logits=True).logits
    assert torch.equal(a, b)


def test_resume_after_interruption_gives_the_same_weights(tiny_base, tmp_path):
    sets = ["training.max_steps=5", "memory.lora_dropout=0.1"]
    straight = stage.run(tiny_cfg(tiny_base, tmp_path / "a", *sets))

    cfg = tiny_cfg(tiny_base, tmp_path / "b", *sets)
    with pytest.raises(stage.TrainingInterrupted) as stop:
        stage.run(cfg, callbacks=[Capture(interrupt_at=2)])
    assert stop.value.checkpoint.name == "checkpoint-3"  # Ctrl-C at step 2: stops after step 3
    assert not Path(cfg.output).exists()  # no artifact from an interrupted run
    with pytest.raises(Exception, match="--resume auto"):
        stage.run(cfg)  # a fresh start would silently abandon the unfinished run
    resumed = stage.run(cfg, resume="auto")

    a, b = load_file(straight / "weaver.safetensors"), load_file(resumed / "weaver.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    a = load_file(straight / "weaver/adapter_model.safetensors")
    b = load_file(resumed / "weaver/adapter_model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert json.loads((resumed / "memgen.json").read_text())["training"]["resumed_from"].endswith(
        "checkpoint-3"
    )


# ------------------------------------------------------------------------- bad inputs
def cli(*args):
    return CliRunner().invoke(app, ["sft-weaver", *map(str, args)])


@pytest.mark.parametrize(
    "lines,extra,message",
    [
        (
            ['{"q": "a", "s": "b", "a": "c"}', '{"q": "a", "a": "c"}'],
            ["--columns", "prompt=q,solution=s,answer=a"],
            "record 2 has no column 's'",
        ),
        ([], [], "is empty"),
        (
            ['{"question": "a", "answer": "#### 1"}', "", '{"question": oops}'],
            [],
            "line 3 is not valid JSON",
        ),
    ],
    ids=["missing-column", "empty-file", "bad-json-line"],
)
def test_bad_data_exits_2_with_its_message(tmp_path, lines, extra, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    result = cli("--recipe", TINY, "--data", path, "--output", tmp_path / "o", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_bad_config_exits_2_with_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  lerning_rate: 0.1\n")
    result = cli("--recipe", recipe)
    assert result.exit_code == 2 and 'Did you mean "learning_rate"' in result.output
    result = cli("--recipe", TINY, "--set", "memory.inferense_latents=3")
    assert result.exit_code == 2 and 'Did you mean "inference_latents"' in result.output
    result = cli("--recipe", TINY, "--data", "gsm9k", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "unknown task 'gsm9k'" in result.output
    result = cli("--recipe", TINY, "--set", "training.schedule=sometimes")
    assert result.exit_code == 2 and "first, random, all" in result.output
    result = cli("--recipe", TINY, "--resume", tmp_path)
    assert result.exit_code == 2 and "not a checkpoint folder" in result.output
    result = cli("--recipe", TINY, "--report-to", "mlflow")
    assert result.exit_code == 2 and "none, tensorboard or wandb" in result.output
    if importlib.util.find_spec("wandb") is None:
        result = cli("--recipe", TINY, "--report-to", "wandb")
        assert result.exit_code == 2 and "pip install wandb" in result.output


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tiny_recipe_end_to_end_on_the_embedded_model(tmp_path):
    out = tmp_path / "out"
    manifest = command_run(cli, out, ARTIFACT_FILES, "--recipe", TINY)
    assert manifest["reasoner"]["name"] == "smollm2-135m"
    assert manifest["training"]["steps"] == 3 and manifest["training"]["task"] == "gsm_symbolic"
    load_artifact(out, device="cpu")


@pytest.mark.slow
def test_two_process_torchrun_writes_one_artifact(tiny_base, tmp_path):
    data = write_problems(tmp_path / "train.jsonl", 12, WORKED)
    out = train_on_two_processes("sft-weaver", TINY, tiny_base, data, tmp_path)
    assert files(out) == ARTIFACT_FILES
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]
    s = json.loads((out / "memgen.json").read_text())["training"]
    # Both processes trained: 3 steps x batch 2 each, and the log knows it ran on 2.
    assert s["world_size"] == 2 and s["samples_per_rank"] == [6, 6]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in rows} == {2}


# ---------------------------------------------------- training forward, more cases
@pytest.mark.parametrize("prompt", [True, False], ids=["prompt+inference", "inference-only"])
def test_training_forward_equals_reference_on_collated_batches(prompt):
    """Collated SFT batches (right padding, uneven lengths), with and without the prompt
    insertion: the frozen-prefix reasoner pass must not change loss or gradients."""
    from conftest import make_memgen
    from memgen_cli.models.training_reference import reference_weave_forward

    mg = make_memgen("llama")
    mg.set_trainable(weaver=True, trigger=False)
    ex = [
        Example("a", "Hi", "1", "one, two. three"),
        Example("b", "What is it?", "2", "a, b"),
        Example("c", "x", "3", "so. it is, 3"),
    ]
    batch = SFTCollator(mg.tokenizer.pad_token_id, "first", 3, prompt)(
        encode_examples(mg, ex, "", None, 512)[0]
    )
    points = Points(batch["prompt_points"], batch["inference_points"])
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], points)
    grads = []
    for fn in (weave_forward, reference_weave_forward):
        mg.zero_grad()
        loss = fn(mg, *args).loss
        loss.backward()
        grads.append(
            (
                float(loss),
                {
                    n: p.grad.clone()
                    for n, p in mg.weaver_parameters().items()
                    if p.grad is not None
                },
            )
        )
    (fast, g_fast), (ref, g_ref) = grads
    assert abs(fast - ref) < 1e-4
    assert set(g_fast) == set(g_ref) and g_ref
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, atol=1e-4, rtol=0, msg=name)


def test_recorded_data_seed_is_the_one_the_split_used(tmp_path):
    # Training on a generated task's eval split draws from its eval seed; record that one.
    cfg = SFTConfig()
    cfg.data.task, cfg.data.size, cfg.data.heldout = "gym:basic_arithmetic", 4, 2
    for split, expected in [("train", "train_seed"), ("test", "eval_seed")]:
        cfg.data.split = split
        task, _, _, seed = stage.load_examples(cfg)
        assert seed == getattr(task, expected)
    assert task.train_seed != task.eval_seed


def test_task_options_reach_the_task():
    # data.options are the task's own options (here a reasoning_gym difficulty), recorded in
    # the artifact's training summary so that eval draws the same kind of problem.
    cfg = load_recipe(
        SFTConfig,
        None,
        [
            "data.task=gym:basic_arithmetic",
            "data.size=6",
            "data.heldout=2",
            "data.options={config: {min_terms: 3, max_terms: 3}, steps: false}",
        ],
    )
    _, train, held, _ = stage.load_examples(cfg)
    assert all(e.meta["metadata"]["num_terms"] == 3 for e in train + held)
    assert all(e.solution == e.answer for e in train)  # steps: false -> bare answers
