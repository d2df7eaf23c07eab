"""``memory.weaver_reads: cache``: the weaver's K query latents, adapter on, read the reasoner's
own cached keys and values of the context instead of running over the context again.

Golden relation (outside the code under test): with the weaver's LoRA B at zero the weaver *is*
the reasoner, so its query latents are what the reasoner computes for them as ordinary input
positions after the stream so far. With ``inject: kv`` every path must then give the plain
reasoner's logits over a stream with the query latents inserted as inputs; with ``inject:
input`` the latents are ``weaver_to_reasoner`` of the reasoner's last states at those queries,
and the stream holds the latents. With a non-zero LoRA the fast paths must equal the slow
per-row references (tokens identical, logits 1e-4, loss and every gradient 1e-4).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_inject_kv import _generation_against_plain, plain_logits, training_against
from test_model import (
    PROMPTS,
    _compare,
    _diverse,
    _training_batch,
    _undecided_trigger,
    embedded_paths_agree,
)
from transformers import LlamaConfig

from conftest import make_memgen, make_model
from helpers import assert_training_equals_reference, checked_kv, forward_and_grads, tiny_artifact
from memgen_cli.artifacts import load_artifact
from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.errors import MemgenError
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.models.memgen import check_inject
from memgen_cli.models.training import weave_forward
from memgen_cli.stages.baseline import weaver_trainable_params

KINDS = ["llama", "qwen2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_memgen(kind="llama", inject="input", zero_b=False, prefix=False, **memory):
    mg = make_memgen(kind, inject=inject, weaver_reads="cache", kv_prefix=prefix, **memory)
    if prefix:  # a random (non-zero) prefix, as training leaves it
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for table in (mg.weaver.prefix_keys, mg.weaver.prefix_values):
                for p in table.values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5 / mg.weaver.prefix_rate)
    return checked_kv(mg, zero_b) if inject == "kv" or zero_b else mg


@torch.no_grad()
def plain_input_logits(mg, ids: list[int], after: dict[int, str]) -> torch.Tensor:
    """The plain reasoner over ``ids`` where, after token i, the K query latents of
    ``after[i]`` are run as ordinary inputs after the stream so far, and ``weaver_to_reasoner``
    of its last states there joins the stream; the logits that predict each next token
    (from the last latent where latents follow a token) (len(ids), V)."""
    tokens = mg.embed(torch.tensor([ids]))
    stream, pred = tokens[:, :0], []

    def run(x):
        n = x.shape[1]
        return mg.reasoner_hidden(x, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None])

    for i in range(len(ids)):
        stream = torch.cat([stream, tokens[:, i : i + 1]], 1)
        if i in after:
            queries = mg.weaver.query_embeds(after[i], 1).to(stream.dtype)
            k = queries.shape[1]
            states = run(torch.cat([stream, queries], 1))[:, -k:]
            stream = torch.cat([stream, mg.weaver.weaver_to_reasoner(states.float())], 1)
        pred.append(stream.shape[1] - 1)
    return mg.lm_head(run(stream)[0, pred])


# ------------------------------------------------------------------ the golden relation
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inject", ["input", "kv"])
def test_zero_lora_b_training_forward_equals_the_plain_reasoner(kind, inject):
    mg = cache_memgen(kind, inject, zero_b=True)
    # input: the latents go through the read-out and the reasoner again (1e-4, as the
    # references); kv: the query latents' keys and values are the memory itself.
    if inject == "kv":
        training_against(mg, plain_logits, atol=1e-5)
    else:
        training_against(mg, plain_input_logits, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_lora_b_kv_generation_equals_the_plain_reasoner(kind):
    mg = _diverse(cache_memgen(kind, "kv", zero_b=True))
    out = _generation_against_plain(mg, GenerationConfig(max_new_tokens=24, memory="weaver"))
    assert sum(i.kind == "inference" for i in out.trace.insertions) >= 4


def test_zero_lora_b_input_generation_equals_the_plain_reasoner():
    mg = _diverse(cache_memgen("qwen2", "input", zero_b=True))
    cfg = GenerationConfig(max_new_tokens=20, memory="weaver")
    out = _generation_against_plain(mg, cfg, golden=plain_input_logits, atol=1e-4)
    assert sum(i.kind == "inference" for i in out.trace.insertions) >= 4


# ------------------------------------------------------------ fast paths equal references
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inject", ["input", "kv"])
def test_training_forward_and_gradients_equal_the_reference(kind, inject):
    mg = cache_memgen(kind, inject, prefix=True)
    assert_training_equals_reference(mg, _training_batch(mg))


def test_gradients_reach_every_layers_lora_and_the_queries():
    mg = cache_memgen("llama", "input")
    mg.set_trainable(weaver=True, trigger=False)
    _, grads = forward_and_grads(mg, weave_forward, _training_batch(mg))
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inject", ["input", "kv"])
@pytest.mark.parametrize("reuse,defer", [(True, True), (False, True), (True, False)])
def test_cached_generation_equals_the_reference(kind, inject, reuse, defer, monkeypatch):
    from memgen_cli import generation

    monkeypatch.setattr(generation._Run, "DEFER", defer)
    monkeypatch.setattr(generation.state, "reusable", lambda config: reuse)
    mg = _diverse(cache_memgen(kind, inject, prefix=True))
    out = _compare(mg, GenerationConfig(max_new_tokens=30, memory="weaver"))
    steps = {(i.row, i.token_index) for i in out.trace.insertions if i.kind == "inference"}
    per_row = [sorted(t for r, t in steps if r == row) for row in range(len(PROMPTS))]
    assert len({tuple(p) for p in per_row}) > 1, "rows must weave at different steps"


def test_cached_generation_with_a_trained_trigger_equals_the_reference():
    mg = _undecided_trigger(_diverse(cache_memgen("qwen2", "input")))
    out = _compare(mg, GenerationConfig(max_new_tokens=24, memory="full"))
    assert any(i.kind == "inference" for i in out.trace.insertions)


# ------------------------------------------------------------------------------ what it saves
def test_a_weave_runs_over_its_k_queries_only():
    """The point of the mode: the adapter-on passes see K positions each, never the context."""
    mg = _diverse(cache_memgen("llama", "input"))
    seen = []
    decoder = mg.reasoner.get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((mg._adapter_on, kwargs["inputs_embeds"].shape)),
        with_kwargs=True,
    )
    try:
        enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
        out = generate(mg, enc["input_ids"], enc["attention_mask"], GenerationConfig(24))
    finally:
        handle.remove()
    weaves = [shape for on, shape in seen if on]
    assert len(weaves) >= 2 and len(out.trace.insertions) >= len(PROMPTS) + 2
    assert {shape[1] for shape in weaves} <= {3, 2}  # K prompt / K inference latents


def test_the_weaver_cache_holds_nothing_and_the_reasoner_cache_is_left_as_it_was():
    mg = cache_memgen("llama", "kv")
    ids = torch.tensor([[5, 6, 7, 8]])
    cache_len = []
    from transformers import DynamicCache

    cache = DynamicCache(config=mg.reasoner.config)
    ones = torch.ones(1, 4, dtype=torch.long)
    mg.reasoner_hidden(mg.embed(ids), ones, torch.arange(4)[None], cache)
    before = [layer.keys.clone() for layer in cache.layers]
    slots, states = mg.weave_on_cache("prompt", cache, ones, torch.tensor([4]))
    cache_len.append(cache.get_seq_length())
    assert cache_len == [4]
    for layer, keys in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys)
    assert slots.positions.tolist() == [[4, 5, 6]] and states.shape[:2] == (1, 3)


# --------------------------------------------------------------------------- budget, refusals
def test_no_input_projection_and_an_honest_trainable_count():
    mg = cache_memgen("llama", "input")
    assert mg.weaver.reasoner_to_weaver is None and mg.weaver.weaver_to_reasoner is not None
    mg.set_trainable(weaver=True, trigger=False)
    count = sum(p.numel() for p in mg.trainable_parameters())
    plain, _ = make_model("llama")
    assert weaver_trainable_params(plain, mg.cfg) == count
    context = make_memgen("llama")
    context.set_trainable(weaver=True, trigger=False)
    hidden = plain.config.hidden_size
    assert (
        sum(p.numel() for p in context.trainable_parameters()) == count + hidden * hidden + hidden
    )


def test_refusals_name_what_to_use_instead():
    llama = make_model("llama")[0].config
    cfg = MemoryConfig(weaver_reads="cache")
    with pytest.raises(MemgenError, match="weaver_reads: context"):
        check_inject(cfg, llama, separate_weaver=True)
    window = LlamaConfig(**{**llama.to_dict(), "sliding_window": 4, "use_sliding_window": True})
    with pytest.raises(MemgenError, match="weaver_reads: context"):
        check_inject(cfg, window, separate_weaver=False)


def test_an_artifact_records_the_mode_and_reloads_it(tmp_path):
    _, art = tiny_artifact(tmp_path, weaver_reads="cache")
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["memory"]["weaver_reads"] == "cache"
    assert not any("reasoner_to_weaver" in k for k in manifest["tensors"]["weaver"])
    a = load_artifact(art, device="cpu")[0]
    assert a.reads_cache
    enc = encode_prompts(a.tokenizer, PROMPTS, "cpu")
    cfg = GenerationConfig(max_new_tokens=8)
    out = generate(a, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True)
    assert len(out.trace.insertions) >= len(PROMPTS)
    del manifest["memory"]["weaver_reads"]  # an artifact written before the key existed
    (art / "memgen.json").write_text(json.dumps(manifest))
    _, old = tiny_artifact(tmp_path / "old")
    manifest = json.loads((old / "memgen.json").read_text())
    del manifest["memory"]["weaver_reads"]
    (old / "memgen.json").write_text(json.dumps(manifest))
    assert load_artifact(old, device="cpu")[0].cfg.weaver_reads == "context"


# ----------------------------------------------------------------------------- inspect-memory
@pytest.mark.parametrize("kind", KINDS)
def test_inspect_memory_recomputes_the_memory_generation_wove(kind):
    """A kv memory is recomputed from the answer (inspection/slots.py): read back, it gives the
    log-probs generation gave, and the weaver's states at the slots are the recorded ones."""
    from memgen_cli.inspection import probe as P
    from memgen_cli.inspection import slots as S

    mg = _diverse(cache_memgen(kind, "kv", prefix=True))
    enc = encode_prompts(mg.tokenizer, PROMPTS[:1], "cpu")
    gen = GenerationConfig(max_new_tokens=30, memory="weaver")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], gen, keep_logits=True)
    found = sorted(out.trace.for_row(0), key=lambda i: i.token_index)
    assert len(found) >= 3
    prompt = enc["input_ids"][0].tolist()
    memory = S.weave(mg, S.slot_stream(mg, prompt, out.tokens[0], P.emitted_eos(out), found))
    teacher, produced = S.continuation_logprobs(mg, memory), P.generated_logprobs(out)
    torch.testing.assert_close(teacher, produced, atol=1e-4, rtol=0)
    for i, ins in enumerate(found):
        states = memory.states[list(memory.stream.chunk(i))]
        torch.testing.assert_close(states, ins.weaver_states, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ the stages
@pytest.fixture(scope="module", params=["input", "kv"])
def chain(request, tmp_path_factory):
    """A tiny base, a small GSM8K-format file, and a weaver that reads the cache, trained on it
    by sft-weaver (with the kv prefix)."""
    from test_inject_kv import sums_file, train

    from helpers import save_tiny_base

    tmp = tmp_path_factory.mktemp(f"cache-{request.param}")
    base = save_tiny_base(tmp / "base")
    data = sums_file(tmp / "train.jsonl")
    out = tmp / "sft"
    sets = ["memory.weaver_reads=cache", f"memory.inject={request.param}", "memory.kv_prefix=true"]
    result = train("sft-weaver", base, data, out, *(x for s in sets for x in ("--set", s)))
    assert result.exit_code == 0, result.output
    return base, data, out, request.param


def test_every_stage_runs_a_weaver_that_reads_the_cache(chain, tmp_path):
    from test_inject_kv import memgen, train

    base, data, art, inject = chain
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["memory"]["weaver_reads"] == "cache"
    assert manifest["memory"]["inject"] == inject
    grpo = tmp_path / "grpo"
    result = train("grpo-weaver", base, data, grpo, "--init", art, "--set", "training.max_steps=2")
    assert result.exit_code == 0, result.output
    assert json.loads((grpo / "memgen.json").read_text())["memory"]["weaver_reads"] == "cache"
    trig = tmp_path / "trigger"
    result = train(
        "train-trigger", base, data, trig, "--artifact", grpo, "--set", "training.temperature=1.0",
        "--set", "training.max_completion_length=24", "--set", "training.max_steps=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = memgen(
        "eval", "--artifact", trig, "--data", data, "--limit", 4, "--max-new-tokens", 12,
        "--memory", "off,weaver,full", "--json", "--output", tmp_path / "eval",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [r["mode"] for r in json.loads(result.stdout)["results"]] == ["off", "weaver", "full"]
    result = memgen("generate", "Hello, there.", "--artifact", art, "--max-new-tokens", 12)
    assert result.exit_code == 0 and "⟨mem 2⟩" in result.output, result.output
    result = memgen(
        "inspect-memory", "--artifact", art, "--prompt", "Hi, there.", "--max-new-tokens", 12,
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inject"] == inject and report["insertions"]


# --------------------------------------------------------------------------- embedded model
@pytest.mark.slow
@pytest.mark.parametrize("inject", ["input", "kv"])
def test_generation_and_training_on_the_embedded_model(inject):
    """SmolLM2 (30 layers, GQA 9/3 heads), a weaver that reads the cache with a LoRA that moves
    it: cached generation gives the reference's tokens, and the training loss the reference's."""
    from memgen_cli.models.base import load_base
    from memgen_cli.models.memgen import MemGenModel

    torch.manual_seed(0)
    base = load_base(device="cpu")
    cfg = MemoryConfig(inject=inject, weaver_reads="cache", prompt_latents=4, inference_latents=4)
    mg = _diverse(MemGenModel(base.model, base.tokenizer, cfg).eval())
    with torch.no_grad():
        for name, p in mg.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    embedded_paths_agree(mg)
