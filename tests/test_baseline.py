"""`memgen baseline sft`: LoRA-SFT of the reasoner with TRL at the weaver's budget.

Fast tests train a 2-layer Llama saved to a temporary directory (``--base DIR``) on a small
GSM8K-format JSONL; the slow one runs the tiny recipe on the embedded SmolLM2 model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import make_model
from helpers import BASELINE_ARTIFACT_FILES as ARTIFACT_FILES
from helpers import WORKED, Capture, files, invoke, plain_names, tiny_config, write_problems
from memgen_cli.artifacts import load_artifact, load_baseline
from memgen_cli.config import BaselineConfig, MemoryConfig, load_recipe
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages import baseline as stage
from memgen_cli.training.sft_data import IGNORE, SFTCollator, encode_examples, tokenize_samples
from memgen_cli.training.sft_run import load_examples

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "baseline-sft.yaml"

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def tiny_cfg(tiny_base, tmp_path, *sets) -> BaselineConfig:
    """The tiny recipe on 12 problems with worked answers (helpers.tiny_config)."""
    return tiny_config(stage, TINY, tiny_base, tmp_path, sets, 12, WORKED)


def losses(out: Path) -> list[float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


# ------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_parameter_counts_are_what_peft_and_the_weaver_really_train(kind):
    model, tok = make_model(kind)
    targets = ["q_proj", "v_proj"]
    peft = get_peft_model(make_model(kind)[0], PeftLoraConfig(r=3, target_modules=targets))
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora == 3 * stage.lora_params_per_rank(model, targets)
    memory = MemoryConfig(prompt_latents=3, inference_latents=2, lora_r=4, lora_alpha=8)
    weaver = MemGenModel(make_model(kind)[0], tok, memory).weaver_parameters()
    assert stage.weaver_trainable_params(model, memory) == sum(p.numel() for p in weaver.values())


def test_matched_rank_is_the_closest_budget():
    model, _ = make_model("llama")
    unit = stage.lora_params_per_rank(model, ["q_proj", "v_proj"])
    assert stage.matched_rank(model, ["q_proj", "v_proj"], 7 * unit + unit // 3) == 7
    assert stage.matched_rank(model, ["q_proj", "v_proj"], 7 * unit + 2 * unit // 3) == 8
    assert stage.matched_rank(model, ["q_proj", "v_proj"], 1) == 1


# --------------------------------------------------------------------------- training
def test_same_samples_and_loss_mask_as_the_weaver(tiny_base, tmp_path):
    """TRL's prepared labels equal sft-weaver's: same prompt, target and mask, token for token."""
    cfg = tiny_cfg(tiny_base, tmp_path)
    _, train, _, _ = load_examples(cfg)
    base = load_base(str(tiny_base), "cpu")
    pairs, _ = tokenize_samples(base.tokenizer, train, "", None, 512)
    weaver = MemGenModel(load_base(str(tiny_base), "cpu").model, base.tokenizer, MemoryConfig())
    encoded, _ = encode_examples(weaver, train, "", None, 512)
    collate = SFTCollator(base.tokenizer.pad_token_id, memory=False)
    import trl

    trainer = trl.SFTTrainer(
        model=base.model,
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "c"), completion_only_loss=True, max_length=None, use_cpu=True
        ),
        train_dataset=stage.as_dataset(pairs),
        processing_class=base.tokenizer,
    )
    for row, enc in zip(trainer.train_dataset, encoded, strict=True):
        labels = collate([enc])["labels"][0].tolist()
        assert row["input_ids"] == enc.input_ids and row["labels"] == labels
        assert all(x == IGNORE for x in labels[: enc.prompt_len])


def test_training_lowers_loss_and_changes_only_lora_tensors(tiny_base, tmp_path):
    # 4 samples, batch 4: every step sees the same samples, so the loss must fall.
    cfg = tiny_cfg(
        tiny_base,
        tmp_path,
        "data.size=4",
        "data.heldout=2",
        "training.batch_size=4",
        "training.max_steps=6",
        "training.learning_rate=0.01",
        "lora.dropout=0.0",
    )
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    got = losses(out)
    assert len(got) == 6 and got[-1] < got[0] * 0.9, got
    held = json.loads((out / "memgen.json").read_text())["training"]["heldout_loss"]
    assert held["lora_final"] < held["memory_off"], held

    trained = {k: v.detach() for k, v in capture.model.state_dict().items()}
    plain = load_base(str(tiny_base), "cpu").model.state_dict()
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    assert lora and all(not torch.all(v == 0) for v in lora.values())
    reasoner = plain_names(trained)
    assert set(reasoner) == set(plain)
    for name, value in plain.items():
        assert torch.equal(reasoner[name], value), f"reasoner tensor {name} changed"
    trainable = [n for n, p in capture.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_artifact_file_set_manifest_and_plain_peft_reload(tiny_base, tmp_path):
    cfg = tiny_cfg(tiny_base, tmp_path)
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    assert files(out) == ARTIFACT_FILES
    assert not stage.checkpoint_dir(cfg).exists()
    assert load_recipe(BaselineConfig, out / "recipe.yaml") == cfg
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["kind"] == "baseline"
    base = load_base(str(tiny_base), "cpu")
    assert manifest["reasoner"]["fingerprint"] == base.fingerprint
    budget, lora = manifest["budget"], manifest["lora"]
    weaver = stage.weaver_trainable_params(base.model, cfg.memory)
    assert budget == {
        "trainable_params": lora["r"] * stage.lora_params_per_rank(base.model, lora["targets"]),
        "weaver_trainable_params": weaver,
    }
    unit = stage.lora_params_per_rank(base.model, lora["targets"])
    assert abs(budget["trainable_params"] - weaver) <= unit / 2  # the closest rank
    s = manifest["training"]
    assert (s["steps"], s["samples"], s["heldout_samples"], s["task"]) == (3, 6, 2, "gsm8k")
    assert s["wall_s"] >= 0 and set(s["heldout_loss"]) == {"memory_off", "lora_final"}
    assert s["task_options"] == {} and s["data_seed"] is None  # file data, file order
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)  # no base weights leak in

    ids = torch.tensor([[5, 40, 41, 42, 43, 7, 9]])
    trained = capture.model.eval()
    with torch.no_grad():
        a = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_base(str(tiny_base), "cpu").model, str(out))
        b = reloaded.eval()(input_ids=ids).logits
        c, _, _ = load_baseline(out, device="cpu")
        plain = load_base(str(tiny_base), "cpu").model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(a, c(input_ids=ids).logits)
    assert not torch.allclose(a, plain)  # the adapter really changes the reasoner


def test_resume_after_interruption_gives_the_same_weights(tiny_base, tmp_path):
    sets = ["training.max_steps=5"]
    straight = stage.run(tiny_cfg(tiny_base, tmp_path / "a", *sets))
    cfg = tiny_cfg(tiny_base, tmp_path / "b", *sets)
    with pytest.raises(stage.TrainingInterrupted) as stop:
        stage.run(cfg, callbacks=[Capture(interrupt_at=2)])
    assert stop.value.checkpoint.name == "checkpoint-3"
    assert not Path(cfg.output).exists()
    with pytest.raises(MemgenError, match="--resume auto"):
        stage.run(cfg)
    resumed = stage.run(cfg, resume="auto")
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(resumed) == losses(straight)


# ---------------------------------------------------------------- kinds and bad inputs
def test_weaver_and_baseline_artifacts_refuse_each_others_place(tiny_base, tiny_weaver, tmp_path):
    baseline = stage.run(tiny_cfg(tiny_base, tmp_path, "training.max_steps=1"))
    _, weaver = tiny_weaver
    with pytest.raises(MemgenError, match="is a LoRA baseline .* not a weaver"):
        load_artifact(baseline, device="cpu")
    with pytest.raises(MemgenError, match="is a weaver artifact .* not a LoRA baseline"):
        load_baseline(weaver, device="cpu")
    result = invoke("generate", "Hi?", "--artifact", baseline)
    assert result.exit_code == 2 and "is a LoRA baseline" in result.output
    assert "Traceback" not in result.output


def cli(*args):
    return invoke("baseline", "sft", *args)


def test_bad_config_exits_2_with_one_message_and_writes_nothing(tiny_base, tmp_path):
    data = write_problems(tmp_path / "d.jsonl", 12, WORKED)
    common = ["--recipe", TINY, "--base", tiny_base, "--data", data, "--output", tmp_path / "o"]
    cases = [
        (["--set", "lora.targts=[q_proj]"], 'Did you mean "targets"'),
        (["--set", "lora.r=0"], "lora.r must be >= 1"),
        (["--set", "lora.targets=[nowhere]"], "match no linear layer"),
        (["--set", "training.scheduler=sometimes"], "is unknown; use one of"),
        (["--report-to", "mlflow"], "none, tensorboard or wandb"),
    ]
    for extra, message in cases:
        result = cli(*common, *extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "o").exists()
    result = cli("--recipe", TINY, "--data", "gsm9k", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "unknown task 'gsm9k'" in result.output


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tiny_recipe_end_to_end_on_the_embedded_model(tmp_path):
    result = cli("--recipe", TINY, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert files(out) == ARTIFACT_FILES
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["kind"] == "baseline" and manifest["reasoner"]["name"] == "smollm2-135m"
    budget = manifest["budget"]
    assert abs(budget["trainable_params"] / budget["weaver_trainable_params"] - 1) < 0.1
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(out))
