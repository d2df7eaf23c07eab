"""``memory.kv_prefix``: a learned key and value per layer and slot that the kv weaver's add to.

Golden relation (outside the code under test): on a one-layer model with the weaver's LoRA B at
zero, the weaver's keys and values at a slot are the reasoner's k_proj / v_proj of the query
latent, so adding the prefix *before* the model's own rotary embedding (a hook on k_proj and
v_proj at the slot columns of the plain reasoner) must give exactly what the kv paths give.
On deeper models the fast paths must equal the slow references with a non-zero prefix.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_inject_kv import _generation_against_plain, plain_logits, training_against
from test_model import _diverse, _training_batch, weaving_generation_equals_reference
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import conftest
from conftest import make_memgen, make_model
from helpers import assert_training_equals_reference, checked_kv, forward_and_grads, tiny_artifact
from memgen_cli.artifacts import load_artifact
from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.models.training import weave_forward
from memgen_cli.stages.baseline import weaver_trainable_params

KINDS = ["llama", "qwen2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def prefix_memgen(kind="llama", zero_b=False, seed=0, **memory):
    """A kv model with a random (non-zero) prefix, as training leaves it."""
    mg = checked_kv(make_memgen(kind, inject="kv", kv_prefix=True, seed=seed, **memory), zero_b)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for table in (mg.weaver.prefix_keys, mg.weaver.prefix_values):
            for p in table.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / mg.weaver.prefix_rate)
    return mg


@pytest.fixture
def one_layer(monkeypatch):
    config = conftest.tiny_config

    def shallow(*args, **kwargs):
        c = config(*args, **kwargs)
        c.num_hidden_layers = 1
        return c

    monkeypatch.setattr(conftest, "tiny_config", shallow)


@torch.no_grad()
def hooked_logits(mg, ids: list[int], after: dict[int, str]) -> torch.Tensor:
    """``plain_logits`` with the prefix added to k_proj / v_proj outputs at the slot columns
    (before the model rotates keys): the one-layer meaning of the prefix."""
    table_k, table_v = (
        torch.cat([t[kind] for kind in ("prompt", "inference")], 2) * mg.weaver.prefix_rate
        for t in (mg.weaver.prefix_keys, mg.weaver.prefix_values)
    )
    first = {"prompt": 0, "inference": mg.weaver.num_latents("prompt")}
    rows, col = {}, 0  # column -> prefix row
    for i in range(len(ids)):
        col += 1
        if i in after:
            k = mg.weaver.num_latents(after[i])
            rows.update({col + j: first[after[i]] + j for j in range(k)})
            col += k
    attn = mg.reasoner.get_decoder().layers[0].self_attn

    def adder(table):
        def hook(module, args, out):
            out = out.clone()
            for c, r in rows.items():
                out[0, c] += table[0][:, r].reshape(-1)
            return out

        return hook

    handles = [
        attn.k_proj.register_forward_hook(adder(table_k)),
        attn.v_proj.register_forward_hook(adder(table_v)),
    ]
    try:
        return plain_logits(mg, ids, after)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ the golden relation
@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_training_forward_equals_the_prefix_added_before_rotation(kind, one_layer):
    mg = prefix_memgen(kind, zero_b=True)
    assert mg.reasoner.config.num_hidden_layers == 1
    for ids, after, want in training_against(mg, hooked_logits):
        # ... and the prefix matters: without it the logits are the plain queries' ones
        assert (plain_logits(mg, ids, after) - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_generation_equals_the_prefix_added_before_rotation(kind, one_layer):
    mg = _diverse(prefix_memgen(kind, zero_b=True))
    cfg = GenerationConfig(max_new_tokens=20, memory="weaver")
    out = _generation_against_plain(mg, cfg, golden=hooked_logits)
    assert sum(i.kind == "inference" for i in out.trace.insertions) >= 3


def test_the_prefix_key_is_rotated_as_the_model_rotates_its_own():
    """``add_prefix`` at positions p equals transformers' own ``apply_rotary_pos_emb``; a slot
    moved by s gives the same attention score to a query moved by s (relative positions)."""
    mg = prefix_memgen("llama")
    heads, k, dim = mg.weaver.prefix_keys["prompt"].shape[1:]
    positions = torch.tensor([[5, 6, 7], [20, 21, 22]])
    index = torch.tensor([[0, 1, 2], [0, 1, 2]])
    zeros = [torch.zeros(2, heads, 3, dim)] * mg.reasoner.config.num_hidden_layers
    keys, values = mg.add_prefix(zeros, zeros, index, positions)
    table = mg.weaver.prefix_keys["prompt"][0] * mg.weaver.prefix_rate  # layer 0: (H, K, D)
    rotary = mg.reasoner.get_decoder().rotary_emb
    cos, sin = rotary(table, positions)
    raw = table[None].expand(2, -1, -1, -1)
    _, want = apply_rotary_pos_emb(raw, raw, cos, sin)
    torch.testing.assert_close(keys[0], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        values[0],
        mg.weaver.prefix_values["prompt"][0][None].expand(2, -1, -1, -1) * mg.weaver.prefix_rate,
    )
    q = torch.randn(1, heads, 1, dim)
    cq, sq = rotary(q, torch.tensor([[30]]))
    cq2, sq2 = rotary(q, torch.tensor([[45]]))
    q30, _ = apply_rotary_pos_emb(q, q, cq, sq)
    q45, _ = apply_rotary_pos_emb(q, q, cq2, sq2)  # slot row 1 sits 15 positions later too
    torch.testing.assert_close(
        q30 @ keys[0][:1].transpose(-1, -2), q45 @ keys[0][1:].transpose(-1, -2), atol=1e-4, rtol=0
    )


# ------------------------------------------------------------ fast paths equal references
@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_and_gradients_equal_the_reference(kind):
    mg = prefix_memgen(kind, lora_targets=["q_proj", "k_proj", "v_proj"])
    assert_training_equals_reference(mg, _training_batch(mg))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_the_reference(kind):
    weaving_generation_equals_reference(prefix_memgen(kind))


# --------------------------------------------------------------- start, rate, count, files
def test_an_untrained_prefix_changes_nothing():
    """The prefix starts at zero: the same model with and without it gives the same logits."""
    with_prefix = make_memgen("llama", inject="kv", kv_prefix=True)
    without = make_memgen("llama", inject="kv")
    batch = _training_batch(without)
    with torch.no_grad():
        a = weave_forward(with_prefix, *batch, return_logits=True)
        b = weave_forward(without, *batch, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_the_rate_scales_what_is_stored_and_the_gradient():
    mg = prefix_memgen("llama", kv_prefix_rate=4.0)
    stored = mg.weaver.prefix_keys["inference"]
    table_k, _ = mg.weaver.prefix_table()
    first = mg.weaver.num_latents("prompt")
    torch.testing.assert_close(table_k[:, :, first:], stored * 4.0)
    batch = _training_batch(mg)
    mg.set_trainable(weaver=True, trigger=False)
    _, g4 = forward_and_grads(mg, weave_forward, batch)
    mg.weaver.prefix_rate = 1.0
    with torch.no_grad():  # the same effective prefix at rate 1
        for t in (mg.weaver.prefix_keys, mg.weaver.prefix_values):
            for p in t.values():
                p.mul_(4.0)
    _, g1 = forward_and_grads(mg, weave_forward, batch)
    name = "weaver.prefix_keys.inference"
    torch.testing.assert_close(g4[name], g1[name] * 4.0, atol=1e-5, rtol=1e-4)


def test_the_trainable_count_includes_the_prefix():
    mg = make_memgen("llama", inject="kv", kv_prefix=True)
    mg.set_trainable(weaver=True, trigger=False)
    count = sum(p.numel() for p in mg.trainable_parameters())
    plain, _ = make_model("llama")
    assert weaver_trainable_params(plain, mg.cfg) == count
    c = plain.config
    per_slot = (
        c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    )
    without = weaver_trainable_params(plain, MemoryConfig(**{**vars(mg.cfg), "kv_prefix": False}))
    assert count - without == 2 * per_slot * (mg.cfg.prompt_latents + mg.cfg.inference_latents)


def test_an_artifact_keeps_the_prefix_and_reloads_it(tmp_path):
    _, art = tiny_artifact(tmp_path, inject="kv", kv_prefix=True)
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["memory"]["kv_prefix"] is True
    stored = load_file(art / "weaver.safetensors")
    model, _, _ = load_artifact(art, device="cpu")
    assert model.cfg.kv_prefix
    for table, name in (
        (model.weaver.prefix_keys, "prefix_keys"),
        (model.weaver.prefix_values, "prefix_values"),
    ):
        for kind in ("prompt", "inference"):
            saved = stored[f"{name}.{kind}"]
            assert saved.abs().max() > 0  # tiny_artifact moves every weaver tensor off its start
            torch.testing.assert_close(table[kind].detach(), saved, atol=0, rtol=0)
