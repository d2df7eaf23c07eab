"""`memgen baseline sft`: LoRA-SFT of the reasoner with TRL at the weaver's budget, and prompt
and prefix tuning (``--method``) at the same budget.

Fast tests train a 2-layer Llama (and, for prompt and prefix tuning, a GQA Qwen2) saved to a
temporary directory (``--base DIR``) on a small GSM8K-format JSONL; the slow ones run the tiny
recipe on the embedded SmolLM2 model.
"""

from __future__ import annotations

import doctest
import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from rich.console import Console
from safetensors.torch import load_file

from conftest import make_model
from helpers import BASELINE_ARTIFACT_FILES as ARTIFACT_FILES
from helpers import WORKED, Capture, files, invoke, plain_names, tiny_config, write_problems
from memgen_cli.artifacts import load_artifact, load_baseline
from memgen_cli.config import BaselineConfig, GenerationConfig, MemoryConfig, load_recipe
from memgen_cli.errors import MemgenError
from memgen_cli.generation import encode_prompts, generate, prompt_learning
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages import baseline as stage
from memgen_cli.training.sft_data import IGNORE, SFTCollator, encode_examples, tokenize_samples
from memgen_cli.training.sft_run import load_examples
from stage_runs import OVERFIT, command_run, finished_run, losses

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "baseline-sft.yaml"

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def tiny_cfg(tiny_base, tmp_path, *sets) -> BaselineConfig:
    """The tiny recipe on 12 problems with worked answers (helpers.tiny_config)."""
    return tiny_config(stage, TINY, tiny_base, tmp_path, sets, 12, WORKED)


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
    cfg = tiny_cfg(tiny_base, tmp_path, *OVERFIT, "data.heldout=2", "lora.dropout=0.0")
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
    out, manifest, capture = finished_run(stage, cfg, ARTIFACT_FILES)
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


# ------------------------------------------------------------------- prompt and prefix tuning
METHODS = ["prompt", "prefix"]


def test_doctests():
    for module in (stage, prompt_learning):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_a_virtual_token_trains_what_peft_trains(kind, method):
    """Per token: the hidden size (prompt), layers × 2 × KV heads × head size (prefix; the
    Qwen2 has 2 KV heads for 4 query heads, so the KV width is half the hidden size)."""
    model, tok = make_model(kind)
    peft = prompt_learning.new_adapter(LoadedBase(model, tok, "t", "t", "f"), method, 5, text=None)
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    unit = prompt_learning.params_per_token(make_model(kind)[0], method)
    assert trainable == 5 * unit == 5 * (32 if method == "prompt" else 2 * 2 * 2 * 8)
    assert prompt_learning.method_of(peft) == method


@pytest.mark.parametrize("method", METHODS)
def test_a_text_start_is_the_reasoner_reading_those_words(method, tmp_path):
    """init: text. Prompt: the words' input embeddings; prefix: the plain reasoner's keys and
    values over them at positions 0 … n−1. Either way the adapted reasoner, fresh, computes what
    the plain one computes after those words."""
    model, tok = make_model("llama")
    plain = make_model("llama")[0]
    source = tmp_path / "tokenizer"  # PEFT's prompt TEXT init loads it from there
    tok.save_pretrained(source)
    peft = prompt_learning.new_adapter(
        LoadedBase(model, tok, "t", str(source), "f"), method, 7, text="Add them."
    )
    words = torch.tensor([prompt_learning.text_ids(tok, "Add them.", 7)])
    ids = torch.tensor([[5, 40, 41, 42]])
    with torch.no_grad():
        after_words = plain(input_ids=torch.cat([words, ids], 1)).logits[:, 7:]
        adapted = peft(input_ids=ids).logits[:, -4:]
    torch.testing.assert_close(adapted, after_words, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_matched_virtual_tokens_are_within_the_budget(kind, tiny_base, tmp_path):
    """The tiny recipe's weaver (3,266 parameters on either) against 32 per prompt token and
    64 per prefix token: both within ±5 %; a count the granularity cannot bring within it is
    printed with the difference."""
    model, _ = make_model(kind)
    cfg = tiny_cfg(tiny_base, tmp_path)
    weaver = stage.weaver_trainable_params(model, cfg.memory)
    for method in METHODS:
        unit = prompt_learning.params_per_token(model, method)
        n = stage.closest_multiple(unit, weaver)
        assert abs(n * unit - weaver) <= unit / 2 and stage.off_budget(n * unit, weaver) is None
    warning = stage.off_budget(1_000, 1_200)
    assert "-16.7% from the weaver's 1,200, outside ±5% (the closest" in warning
    assert "(as the recipe sets it)" in stage.off_budget(1_300, 1_200, matched=False)


def method_cfg(base, tmp_path, method, *sets):
    """4 samples, batch 4, 6 steps at a high rate: every step sees the same samples, so the
    loss must fall."""
    return tiny_cfg(
        base,
        tmp_path,
        f"method={method}",
        "data.size=4",
        "data.heldout=2",
        "training.batch_size=4",
        "training.max_steps=6",
        "training.learning_rate=0.05",
        *sets,
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_prompt_and_prefix_train_at_the_weavers_budget_into_a_peft_adapter(
    method, kind, tiny_base, tiny_qwen_base, tmp_path
):
    base_dir = tiny_base if kind == "llama" else tiny_qwen_base
    cfg = method_cfg(base_dir, tmp_path, method)
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    got = losses(out)
    assert len(got) == 6 and all(map(torch.isfinite, torch.tensor(got)))
    assert got[-1] < got[0] * 0.95, got

    # Only the virtual tokens changed; every reasoner tensor is the plain model's.
    before, after = capture.initial, capture.model.state_dict()
    trainable = [n for n, p in capture.model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    assert not torch.equal(before[trainable[0]], after[trainable[0]])
    plain = load_base(str(base_dir), "cpu").model.state_dict()
    reasoner = {k.removeprefix("base_model."): v for k, v in after.items() if "base_model." in k}
    assert set(reasoner) == set(plain)
    assert all(torch.equal(reasoner[k], v) for k, v in plain.items())

    # The artifact: a PEFT adapter with the virtual tokens only, the method and the budget.
    assert files(out) == ARTIFACT_FILES
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["kind"] == "baseline" and manifest["method"] == method
    assert "lora" not in manifest and manifest["training"]["method"] == f"{method}-sft"
    settings, budget = manifest["prompt_learning"], manifest["budget"]
    unit = prompt_learning.params_per_token(load_base(str(base_dir), "cpu").model, method)
    assert budget["trainable_params"] == settings["num_virtual_tokens"] * unit
    assert abs(budget["trainable_params"] / budget["weaver_trainable_params"] - 1) <= 0.05
    assert settings["tokens_rule"].startswith("matched") and settings["init"] == "text"
    assert set(manifest["training"]["heldout_loss"]) == {"memory_off", f"{method}_final"}
    tensors = load_file(out / "adapter_model.safetensors")
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": [settings["num_virtual_tokens"], unit]
    }
    assert load_recipe(BaselineConfig, out / "recipe.yaml") == cfg

    # PeftModel.from_pretrained(base, DIR) and load_baseline give the trained model's logits.
    ids = torch.tensor([[5, 40, 41, 42, 43, 7, 9], [5, 50, 51, 52, 53, 7, 9]])
    with torch.no_grad():
        a = capture.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_base(str(base_dir), "cpu").model, str(out))
        b = reloaded.eval()(input_ids=ids).logits
        c = load_baseline(out, device="cpu")[0](input_ids=ids).logits
        d = load_base(str(base_dir), "cpu").model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a[:, -7:], d)  # the virtual tokens change the reasoner


def test_random_start_and_a_set_token_count(tiny_base, tmp_path):
    cfg = tiny_cfg(
        tiny_base,
        tmp_path,
        "method=prefix",
        "prompt_learning.init=random",
        "prompt_learning.num_virtual_tokens=3",
        "training.max_steps=1",
    )
    console = Console(record=True, width=300)
    out = stage.run(cfg, console=console)
    printed = " ".join(console.export_text().split())
    assert (
        "prefix tuning, 3 virtual tokens, 192 trainable parameters (the weaver: 3,266)" in printed
    )
    assert "192 trainable parameters are -94.1% from the weaver's 3,266" in printed
    manifest = json.loads((out / "memgen.json").read_text())
    settings = manifest["prompt_learning"]
    assert (settings["num_virtual_tokens"], settings["tokens_rule"]) == (3, "set")
    assert (settings["init"], settings["init_text"], settings["prefix_projection"]) == (
        "random",
        None,
        False,
    )
    assert manifest["budget"]["trainable_params"] == 3 * 64


@pytest.fixture(scope="module")
def three_baselines(tiny, tmp_path_factory):
    """A LoRA, a prompt and a prefix baseline on the tiny Llama, trained on ``tiny``'s data."""
    base, _, data = tiny
    tmp = tmp_path_factory.mktemp("three")
    sets = ["training.learning_rate=0.05", "training.max_steps=4", "data.heldout=0"]
    out = {}
    for method in ("lora", "prompt", "prefix"):
        cfg = stage.resolve_config(
            TINY, sets, method=method, base=str(base), data=str(data), output=tmp / method
        )
        out[method] = stage.run(cfg, console=Console(file=open(os.devnull, "w")))
    return out


def test_eval_runs_one_row_per_baseline_on_the_same_problems(tiny, three_baselines, tmp_path):
    _, _, data = tiny
    paths = [three_baselines[m] for m in ("lora", "prompt", "prefix")]
    result = invoke(
        "eval", "--artifact", ",".join(map(str, paths)), "--data", data, "--limit", 4,
        "--max-new-tokens", 6, "--batch-size", 3, "--output", tmp_path, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [(r["artifact"], r["mode"]) for r in got["results"]] == [(str(p), "off") for p in paths]
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    ids = {str(p): [q["id"] for q in preds if q["artifact"] == str(p)] for p in paths}
    assert all(v == ids[str(paths[0])] and len(v) == 4 for v in ids.values())
    assert (
        len({tuple(q["completion"] for q in preds if q["artifact"] == str(p)) for p in paths}) > 1
    )

    # The prompt and prefix rows are PEFT's own forward, greedy: the slow path, one row at a
    # time, the whole sequence recomputed at every step.
    for path in paths[1:]:
        model, _, loaded = load_baseline(path, device="cpu")
        tok = loaded.tokenizer
        for q in (q for q in preds if q["artifact"] == str(path)):
            msgs = [{"role": "user", "content": q["prompt"]}]
            ids_ = encode_prompts(tok, [msgs], "cpu")["input_ids"]
            assert (
                tok.decode(slow_greedy(model, ids_, 6, tok), skip_special_tokens=True)
                == (q["completion"])
            )


@torch.no_grad()
def slow_greedy(model, ids: torch.Tensor, steps: int, tok) -> list[int]:
    out = []
    for _ in range(steps):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoding_after_a_prefix_is_memory_offs_generation(kind):
    """``generate_after`` with no prefix gives memgen's memory-off tokens (greedy and sampled)
    on a left-padded batch; with a prefix, PEFT's own forward, greedy (above, through eval)."""
    model, tok = make_model(kind)
    memgen = MemGenModel(model, tok, MemoryConfig()).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Hi, 12 + 13 = ?")]
    enc = encode_prompts(tok, prompts, "cpu")
    for cfg in (
        GenerationConfig(12, memory="off"),
        GenerationConfig(12, temperature=1.0, top_p=0.9, seed=3, memory="off"),
    ):
        ours = prompt_learning.generate_after(
            memgen, None, enc["input_ids"], enc["attention_mask"], cfg
        )
        theirs = generate(memgen, enc["input_ids"], enc["attention_mask"], cfg)
        assert (ours.tokens, ours.finished) == (theirs.tokens, theirs.finished)


def test_a_prefix_run_resumes_to_the_same_tokens(tiny_base, tmp_path):
    sets = ["method=prefix", "training.max_steps=5"]
    straight = stage.run(tiny_cfg(tiny_base, tmp_path / "a", *sets))
    cfg = tiny_cfg(tiny_base, tmp_path / "b", *sets)
    with pytest.raises(stage.TrainingInterrupted):
        stage.run(cfg, callbacks=[Capture(interrupt_at=2)])
    with pytest.raises(MemgenError, match=r'method: "prefix" \(checkpoint\) vs "lora" \(now\)'):
        stage.run(tiny_cfg(tiny_base, tmp_path / "b", "training.max_steps=5"), resume="auto")
    resumed = stage.run(cfg, resume="auto")
    a = load_file(straight / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(a, load_file(resumed / "adapter_model.safetensors")["prompt_embeddings"])
    assert losses(resumed) == losses(straight)


# ----------------------------------------------------------------------- method: bad inputs
def test_an_unknown_method_is_refused_with_the_choices(tiny_base, tmp_path):
    data = write_problems(tmp_path / "d.jsonl", 12, WORKED)
    common = ["--recipe", TINY, "--base", tiny_base, "--data", data, "--output", tmp_path / "o"]
    for extra in (["--method", "prefx"], ["--set", "method=prefx"]):
        result = cli(*common, *extra)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert 'method "prefx" is unknown; use one of lora, prompt, prefix' in text
        assert 'Did you mean "prefix"' in text and "Traceback" not in text
        assert text.count("unknown") == 1
        assert not (tmp_path / "o").exists()
    result = cli(*common, "--method", "prompt", "--set", "prompt_learning.num_virtual_tokens=0")
    assert result.exit_code == 2 and "num_virtual_tokens must be >= 1" in result.output
    result = cli(*common, "--method", "prompt", "--set", "prompt_learning.num_virtual_tokens=600")
    assert result.exit_code == 2 and "exceed the 512 positions" in " ".join(result.output.split())


def test_a_matched_prompt_far_longer_than_the_samples_is_warned():
    from memgen_cli.generation.prompt_learning import long_prompt

    matched = {"num_virtual_tokens": 2774, "tokens_rule": "matched to the weaver's trainable"}
    text = long_prompt(matched, 120)
    assert "2,774 virtual tokens" in text and "--set prompt_learning.num_virtual_tokens=100" in text
    assert long_prompt(matched, 700) is None  # at most four times the longest sample
    assert long_prompt({**matched, "num_virtual_tokens": 139}, 120) is None  # prefix's count
    assert long_prompt({**matched, "tokens_rule": "set"}, 120) is None  # the user's own count
    assert long_prompt({"r": 28, "rank_rule": "matched"}, 0) is None  # LoRA


def test_baseline_grpo_refuses_a_prompt_or_prefix_init(three_baselines, tmp_path):
    from memgen_cli.stages import baseline_grpo

    for method in METHODS:
        cfg = baseline_grpo.resolve_config(
            ROOT / "recipes" / "tiny" / "baseline-grpo.yaml",
            [f"init={three_baselines[method]}", f"output={tmp_path / 'o'}"],
        )
        name = {"prompt": "prompt tuning", "prefix": "prefix tuning"}[method]
        with pytest.raises(MemgenError, match=f"is a {name} baseline; baseline grpo trains LoRA"):
            baseline_grpo.validate(cfg, None)


def test_a_prompt_baseline_is_not_a_weaver(three_baselines):
    with pytest.raises(MemgenError, match="is a prompt tuning baseline .* not a weaver"):
        load_artifact(three_baselines["prompt"], device="cpu")


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tiny_recipe_end_to_end_on_the_embedded_model(tmp_path):
    out = tmp_path / "out"
    manifest = command_run(cli, out, ARTIFACT_FILES, "--recipe", TINY)
    assert manifest["kind"] == "baseline" and manifest["reasoner"]["name"] == "smollm2-135m"
    budget = manifest["budget"]
    assert abs(budget["trainable_params"] / budget["weaver_trainable_params"] - 1) < 0.1
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(out))


@pytest.mark.slow
def test_the_results_tables_recipe_budgets_on_smollm2():
    """Golden counts (docs/stages/baseline.md), by instantiating each adapter: no training."""
    recipe = ROOT / "recipes" / "smollm2-135m" / "basic_arithmetic" / "baseline-sft.yaml"
    counts = {}
    for method in ("lora", "prompt", "prefix"):
        cfg = stage.resolve_config(recipe, method=method, base="smollm2-135m")
        base = load_base("smollm2-135m", "cpu")
        if method == "lora":
            lora, peft_config, weaver = stage.lora_settings(base, cfg.lora, cfg.memory)
            model, n = get_peft_model(base.model, peft_config), lora["r"]
        else:
            settings, model, weaver = stage.prompt_learning_settings(base, cfg, 256)
            n = settings["num_virtual_tokens"]
        counts[method] = (n, sum(p.numel() for p in model.parameters() if p.requires_grad))
        assert weaver == 1_609_346
    assert counts == {
        "lora": (28, 1_612_800),
        "prompt": (2_794, 1_609_344),
        "prefix": (140, 1_612_800),
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_tiny_recipe_prompt_and_prefix_on_the_embedded_model(method, tmp_path):
    """Prefix tuning at the matched budget. Prompt tuning's matched count (1,562 virtual
    tokens) took 3× the LoRA's time (547 s against 190 s, 2 busy cores), so it runs with 16,
    and says how far that is from the weaver's budget (the budget test above covers the match)."""
    sets = ["--set", "prompt_learning.num_virtual_tokens=16"] if method == "prompt" else []
    result = cli("--recipe", TINY, "--method", method, *sets, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert files(out) == ARTIFACT_FILES
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["method"] == method and manifest["reasoner"]["name"] == "smollm2-135m"
    budget = manifest["budget"]
    printed = " ".join(result.output.split())
    assert f"(the weaver: {budget['weaver_trainable_params']:,})" in printed
    gap = budget["trainable_params"] / budget["weaver_trainable_params"] - 1
    if method == "prefix":
        assert abs(gap) <= 0.05 and "warning" not in printed
    else:
        assert budget["trainable_params"] == 16 * 576
        assert (
            f"are {gap:+.1%} from the weaver's" in printed and "(as the recipe sets it)" in printed
        )
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(out))
