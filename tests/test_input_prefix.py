"""``memory.kv_prefix`` with ``memory.inject: input``: the reasoner reads the weaver's latents at
its input, and a learned key and value per layer and slot is added to what it computes there.

Golden relation (outside the code under test): the reasoner over the woven stream (token
embeddings and the recorded latents), with the prefix added by hand, column by column, to every
layer's k_proj / v_proj output at the latent columns, gives the logits the training forward,
cached generation and inspect-memory give. The fast paths must equal the slow references.
"""

from __future__ import annotations

import pytest
import torch
from test_model import (
    PROMPTS,
    _diverse,
    _training_batch,
    embedded_paths_agree,
    weaving_generation_equals_reference,
)

from conftest import make_memgen, make_model
from helpers import assert_training_equals_reference, tiny_artifact
from memgen_cli.artifacts import load_artifact
from memgen_cli.config import GenerationConfig
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.inspection import probe as P
from memgen_cli.models.training import weave_forward
from memgen_cli.stages.baseline import weaver_trainable_params

KINDS = ["llama", "qwen2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def input_prefix_memgen(kind="llama", seed=0, **memory):
    """An input-mode model with a random (non-zero) prefix, as training leaves it."""
    mg = make_memgen(kind, kv_prefix=True, seed=seed, **memory)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for table in (mg.weaver.prefix_keys, mg.weaver.prefix_values):
            for p in table.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / mg.weaver.prefix_rate)
    return mg


@torch.no_grad()
def hooked_stream_logits(mg, ids: list[int], woven: dict[int, tuple[str, torch.Tensor]]):
    """The plain reasoner's logits at every token of ``ids`` with ``woven[i]`` = (kind, latents
    (K, D)) inserted after token i, the prefix added by hand at every layer to the k_proj /
    v_proj outputs of the latent columns. Row i predicts token i + 1 (from the chunk's last
    latent when one follows token i)."""
    first = {"prompt": 0, "inference": mg.weaver.num_latents("prompt")}
    embeds, rows, pred, col = [], {}, [], 0
    tokens = mg.embed(torch.tensor([ids]))[0]
    for i in range(len(ids)):
        embeds.append(tokens[i : i + 1])
        col += 1
        if i in woven:
            kind, latents = woven[i]
            embeds.append(latents.to(tokens.dtype))
            rows.update({col + j: first[kind] + j for j in range(latents.shape[0])})
            col += latents.shape[0]
        pred.append(col - 1)
    stream = torch.cat(embeds)[None]
    scale = mg.weaver.prefix_rate
    handles = []
    for layer, block in enumerate(mg.reasoner.get_decoder().layers):
        for proj, table in (
            (block.self_attn.k_proj, mg.weaver.prefix_keys),
            (block.self_attn.v_proj, mg.weaver.prefix_values),
        ):

            def hook(module, args, out, layer=layer, table=table):
                out = out.clone()
                for c, r in rows.items():
                    kind = "prompt" if r < first["inference"] else "inference"
                    out[0, c] += table[kind][layer][:, r - first[kind]].reshape(-1) * scale
                return out

            handles.append(proj.register_forward_hook(hook))
    try:
        n = stream.shape[1]
        hidden = mg.reasoner_hidden(
            stream, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None]
        )
    finally:
        for h in handles:
            h.remove()
    return mg.lm_head(hidden[0, pred])


# ------------------------------------------------------------------ the golden relation
@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_equals_the_prefix_added_by_hand(kind):
    mg = input_prefix_memgen(kind)
    ids, mask, labels, points = _training_batch(mg)
    with torch.no_grad():
        out = weave_forward(mg, ids, mask, labels, points, return_logits=True)
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            tokens = mg.embed(ids[b, real][None])
            woven, prev, seen = {}, -1, []
            for point, kind_ in points.row(b):  # the weaver re-reads its prefix: the reference
                seen.append(tokens[:, prev + 1 : point + 1])
                prefix = torch.cat(seen, 1)
                n = prefix.shape[1]
                latents, _ = mg.weave(
                    kind_, prefix, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None],
                    mg.new_weaver_cache(), torch.tensor([n]),
                )  # fmt: skip
                seen.append(latents)
                woven[point] = (kind_, latents[0])
                prev = point
            want = hooked_stream_logits(mg, ids[b, real].tolist(), woven)
            torch.testing.assert_close(out.logits[b, real], want, atol=1e-5, rtol=0)
            # ... and the prefix matters: without it the logits differ
            bare = input_prefix_memgen(kind)
            bare.weaver.prefix_keys = bare.weaver.prefix_values = None
            plain = weave_forward(bare, ids, mask, labels, points, return_logits=True)
            assert (plain.logits[b, real] - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_the_prefix_added_by_hand(kind):
    mg = _diverse(input_prefix_memgen(kind))
    enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
    cfg = GenerationConfig(max_new_tokens=20, memory="weaver")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True)
    assert sum(i.kind == "inference" for i in out.trace.insertions) >= 3
    for row in range(len(PROMPTS)):
        prompt = enc["input_ids"][row, enc["attention_mask"][row].bool()].tolist()
        woven = {
            len(prompt) - 1 + i.token_index: (i.kind, i.latents) for i in out.trace.for_row(row)
        }
        want = hooked_stream_logits(mg, prompt + out.tokens[row], woven)
        for step in range(len(out.tokens[row])):
            got = out.step_logits[step][row]
            torch.testing.assert_close(got, want[len(prompt) - 1 + step], atol=1e-4, rtol=0)


# ------------------------------------------------------------ fast paths equal references
@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_and_gradients_equal_the_reference(kind):
    mg = input_prefix_memgen(kind)
    assert_training_equals_reference(mg, _training_batch(mg))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_the_reference(kind):
    weaving_generation_equals_reference(input_prefix_memgen(kind))


def test_inspect_memory_reads_the_generators_logprobs():
    """inspect-memory's teacher-forced pass over the recorded stream carries the prefix."""
    mg = _diverse(input_prefix_memgen("llama"))
    enc = encode_prompts(mg.tokenizer, PROMPTS[:1], "cpu")
    gen = GenerationConfig(max_new_tokens=30, memory="weaver")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], gen, keep_logits=True)
    found = out.trace.for_row(0)
    assert len(found) >= 3
    stream = P.build_stream(
        mg, enc["input_ids"][0].tolist(), out.tokens[0], P.emitted_eos(out), found
    )
    torch.testing.assert_close(
        P.continuation_logprobs(mg, stream), P.generated_logprobs(out), atol=1e-4, rtol=0
    )
    with P.eager_attention(mg):  # the attention pass reads the same stream, prefix included
        deep = P.deep_pass(mg, stream)
    hidden = mg.reasoner_hidden(
        stream.embeds, *stream.mask_and_positions(), slots=stream.prefix_slots(mg)
    )[0]
    torch.testing.assert_close(deep.hidden, hidden, atol=1e-4, rtol=0)


# --------------------------------------------------------------- start, count, files
def test_an_untrained_prefix_changes_nothing():
    with_prefix = make_memgen("llama", kv_prefix=True)
    without = make_memgen("llama")
    batch = _training_batch(without)
    with torch.no_grad():
        a = weave_forward(with_prefix, *batch, return_logits=True)
        b = weave_forward(without, *batch, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_the_trainable_count_includes_the_prefix():
    mg = make_memgen("llama", kv_prefix=True)
    mg.set_trainable(weaver=True, trigger=False)
    plain, _ = make_model("llama")
    assert weaver_trainable_params(plain, mg.cfg) == sum(
        p.numel() for p in mg.trainable_parameters()
    )


def test_an_artifact_keeps_the_prefix_and_reloads_it(tmp_path):
    _, art = tiny_artifact(tmp_path, kv_prefix=True)
    model, _, _ = load_artifact(art, device="cpu")
    assert model.cfg.kv_prefix and model.cfg.inject == "input"
    assert model.weaver.prefix_keys["inference"].abs().max() > 0


# --------------------------------------------------------------------------- embedded model
@pytest.mark.slow
def test_generation_and_training_on_the_embedded_model():
    """SmolLM2 (30 layers, GQA 9/3 heads) with a non-zero prefix: cached generation gives the
    reference's tokens, training loss equals the reference's, and the prefix moves the logits."""
    from memgen_cli.config import MemoryConfig
    from memgen_cli.models.base import load_base
    from memgen_cli.models.memgen import MemGenModel

    torch.manual_seed(0)
    base = load_base(device="cpu")
    cfg = MemoryConfig(kv_prefix=True, prompt_latents=4, inference_latents=4)
    mg = _diverse(MemGenModel(base.model, base.tokenizer, cfg).eval())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for table in (mg.weaver.prefix_keys, mg.weaver.prefix_values):
            for p in table.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 / mg.weaver.prefix_rate)
    a, batch = embedded_paths_agree(mg)
    with torch.no_grad():
        mg.weaver.prefix_keys = mg.weaver.prefix_values = None
        assert abs(float(weave_forward(mg, *batch).loss) - float(a.loss)) > 1e-3


def test_the_prefix_gradient_is_the_same_on_every_run():
    """The prefix's rows are gathered so that their gradient adds up in one order: with advanced
    indexing (``table[:, at]``) the backward accumulated the repeated rows with parallel atomic
    adds, and at these sizes on 2 threads 30 identical backward passes gave 4 different
    gradients (two identical trainings ended at held-out loss 0.0937 and 0.0991)."""
    from memgen_cli.models.memgen import _adds_prefix

    g = torch.Generator().manual_seed(0)
    heads, slots, dim, batch, length = 3, 16, 64, 16, 300
    table = torch.randn(heads, slots, dim, generator=g, requires_grad=True)
    at = torch.randint(0, slots, (batch, length), generator=g)
    at[:, 8:] = 0  # columns that are not slots read row 0, as ``input_prefix`` clamps them
    on = torch.rand(batch, length, 1, generator=g) > 0.9
    upstream = torch.randn(batch, length, heads * dim, generator=g)
    hook = _adds_prefix(table, at, on)
    out = torch.zeros(batch, length, heads * dim)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = set()
        for _ in range(30):
            table.grad = None
            (hook(None, None, out) * upstream).sum().backward()
            grads.add(table.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1
    rows = table[:, at].permute(1, 2, 0, 3).flatten(2)  # the same values as indexing gives
    assert torch.equal(hook(None, None, out), torch.where(on, rows, 0.0))
