"""Artifact round trip: exact files, equal tensors, identical outputs; clear errors when damaged."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import make_model
from helpers import tiny_artifact
from memgen_cli.artifacts import artifact_digest, atomic_dir, load_artifact, read_manifest
from memgen_cli.config import GenerationConfig
from memgen_cli.errors import MemgenError
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.models.base import load_base

FILES = {
    "memgen.json",
    "recipe.yaml",
    "weaver.safetensors",
    "weaver/adapter_config.json",
    "weaver/adapter_model.safetensors",
}


def _files(path):
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def _answers(mg):
    prompts = [[{"role": "user", "content": "one, two."}], [{"role": "user", "content": "abc"}]]
    enc = encode_prompts(mg.tokenizer, prompts, "cpu")
    return generate(
        mg,
        enc["input_ids"],
        enc["attention_mask"],
        GenerationConfig(max_new_tokens=12),
        keep_logits=True,
    )


@pytest.mark.parametrize("trained_trigger", [False, True])
def test_round_trip_exact_files_equal_tensors_same_outputs(tmp_path, trained_trigger):
    base_dir, art = tiny_artifact(tmp_path, trained_trigger=trained_trigger)
    expected = FILES | ({"trigger.safetensors"} if trained_trigger else set())
    assert _files(art) == expected
    manifest = read_manifest(art)
    assert manifest["kind"] == ("memgen" if trained_trigger else "weaver")
    assert manifest["prompt"]["prompt_suffix"] == "Answer briefly."

    first, _, _ = load_artifact(art, device="cpu")
    second, _, _ = load_artifact(art, device="cpu")
    for (name, a), b in zip(
        first.weaver.state_dict().items(), second.weaver.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    saved = load_file(art / "weaver.safetensors")
    for name, tensor in first.weaver.state_dict().items():
        assert torch.equal(saved[name], tensor)
    a, b = _answers(first), _answers(second)
    assert a.tokens == b.tokens
    for x, y in zip(a.step_logits, b.step_logits, strict=True):
        assert torch.equal(x, y)


def test_artifact_holds_only_trainable_tensors_and_adapter_is_peft_loadable(tiny_weaver):
    base_dir, art = tiny_weaver
    adapter = load_file(art / "weaver" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the base model never leaks in
    plain, _ = make_model("llama")
    peft = PeftModel.from_pretrained(plain, art / "weaver")
    assert any("lora_A" in n for n, _ in peft.named_parameters())


def test_wrong_base_is_refused_with_both_fingerprints(tiny_weaver, tiny_qwen_base):
    _, art = tiny_weaver
    other = load_base(str(tiny_qwen_base), device="cpu")
    with pytest.raises(
        MemgenError, match=r"trained on base .*\(fingerprint .*you passed .*--allow-base-mismatch"
    ):
        load_artifact(art, other)


def test_missing_file_is_named(tmp_path):
    _, art = tiny_artifact(tmp_path)
    (art / "weaver.safetensors").unlink()
    with pytest.raises(MemgenError, match="incomplete: missing weaver.safetensors"):
        load_artifact(art, device="cpu")


def test_truncated_safetensors_is_reported(tmp_path):
    _, art = tiny_artifact(tmp_path)
    data = (art / "weaver.safetensors").read_bytes()
    (art / "weaver.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MemgenError, match="not a readable safetensors file.*truncated"):
        load_artifact(art, device="cpu")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps({**m, "format_version": 99}), "format_version 99"),
        (
            lambda m: json.dumps({k: v for k, v in m.items() if k != "memory"}),
            'missing the "memory" section',
        ),
    ],
)
def test_bad_manifest(tmp_path, damage, message):
    _, art = tiny_artifact(tmp_path)
    manifest = json.loads((art / "memgen.json").read_text())
    (art / "memgen.json").write_text(damage(manifest))
    with pytest.raises(MemgenError, match=message):
        read_manifest(art)


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, art = tiny_artifact(tmp_path)
    manifest = json.loads((art / "memgen.json").read_text())
    manifest["tensors"]["weaver"]["queries.prompt"] = [99, 32]
    (art / "memgen.json").write_text(json.dumps(manifest))
    with pytest.raises(
        MemgenError, match=r"queries.prompt has shape \[3, 32\], manifest says \[99, 32\]"
    ):
        load_artifact(art, device="cpu")


def test_atomic_dir_keeps_old_artifact_on_failure(tmp_path):
    _, art = tiny_artifact(tmp_path)
    before = artifact_digest(art)
    with pytest.raises(RuntimeError):
        with atomic_dir(art) as tmp:
            (tmp / "memgen.json").write_text("half")
            raise RuntimeError("crash mid-write")
    assert artifact_digest(art) == before
    assert sorted(p.name for p in art.parent.iterdir() if p.name.startswith(".")) == []


def test_missing_directory(tmp_path):
    with pytest.raises(MemgenError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    shutil.rmtree(tmp_path)
