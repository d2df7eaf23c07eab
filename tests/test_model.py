"""The composed model: one copy of weights, reasoner untouched, fast paths equal the reference."""

import functools

import pytest
import torch

from conftest import make_memgen, make_model
from helpers import chats, forward_and_grads
from memgen_cli.config import GenerationConfig
from memgen_cli.generation import (
    encode_prompts,
    generate,
    pass_groups,
    reference_generate,
    sample,
)
from memgen_cli.models import kv
from memgen_cli.models.training import Points, weave_forward
from memgen_cli.models.training_reference import reference_weave_forward

PROMPTS = chats("Hi there, what is 2+2?", "x", "Tell me a story about cats.", "List three primes.")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_reasoner_pass_with_adapter_equals_plain_model(kind):
    plain, tok = make_model(kind)
    mg = make_memgen(kind)  # same seed: same base weights, plus a non-zero LoRA adapter
    enc = encode_prompts(tok, PROMPTS, "cpu")
    ref = plain(**enc).logits
    from memgen_cli.models.latents import positions_from_mask

    pos = positions_from_mask(enc["attention_mask"])
    hidden = mg.reasoner_hidden(mg.embed(enc["input_ids"]), enc["attention_mask"], pos)
    torch.testing.assert_close(mg.lm_head(hidden), ref, atol=1e-5, rtol=0)
    # ... and the adapter really is there: with it on, the backbone computes something else.
    with mg.weaver_adapter():
        on = mg.reasoner.get_decoder()(inputs_embeds=mg.embed(enc["input_ids"])).last_hidden_state
    assert (on - hidden).abs().max() > 1e-3


def test_one_copy_of_the_weights():
    mg = make_memgen("llama")
    assert mg.weaver_lm is mg.reasoner  # the weaver's backbone is the reasoner's own model
    base = {id(p) for n, p in mg.reasoner.named_parameters() if "lora_" not in n}
    peft_base = {id(p) for n, p in mg.peft.named_parameters() if "lora_" not in n}
    assert base == peft_base


def _diverse(mg):
    """Random clause table (25% of the vocab) so rows weave at different steps."""
    g = torch.Generator().manual_seed(1)
    mg.delimiters = torch.rand(len(mg.delimiters), generator=g) < 0.25
    return mg


def _compare(mg, cfg):
    enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
    fast = generate(mg, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True)
    ref = reference_generate(mg, enc["input_ids"], enc["attention_mask"], cfg)
    assert fast.tokens == ref.tokens
    assert fast.finished == ref.finished
    for row in range(len(PROMPTS)):
        for step, logits in enumerate(ref.step_logits[row]):
            torch.testing.assert_close(fast.step_logits[step][row], logits, atol=1e-4, rtol=0)
    key = lambda i: (i.row, i.token_index, i.kind)  # noqa: E731
    assert sorted(map(key, fast.trace.insertions)) == sorted(map(key, ref.trace.insertions))
    for a, b in zip(
        sorted(fast.trace.insertions, key=key), sorted(ref.trace.insertions, key=key), strict=True
    ):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=0)
    return fast


def weaving_generation_equals_reference(mg, min_inference: int = 3):
    """``_compare`` on a diversified ``mg`` weaving at every boundary, with at least
    ``min_inference`` inference insertions (so that the comparison covers them)."""
    out = _compare(_diverse(mg), GenerationConfig(max_new_tokens=24, memory="weaver"))
    assert sum(i.kind == "inference" for i in out.trace.insertions) >= min_inference
    return out


@pytest.mark.parametrize("kind,weaver_kind", [("llama", None), ("qwen2", None), ("llama", "qwen2")])
@pytest.mark.parametrize("reuse,defer", [(True, True), (False, True), (True, False)])
def test_cached_generation_equals_reference(kind, weaver_kind, reuse, defer, monkeypatch):
    """With latents written into masked columns (``kv.write_rows``) and with every chunk
    appended as new columns, as on a sliding-window model; with weaves that wait a step to
    share a pass with the next step's (``_Run.DEFER``) and without."""
    from memgen_cli import generation

    monkeypatch.setattr(generation._Run, "DEFER", defer)
    waited = []  # steps after which some row's weave waits for the next step
    step = generation._Run.step
    monkeypatch.setattr(
        generation._Run,
        "step",
        lambda run, *a: (step(run, *a), waited.append(bool(run.due.any())))[0],
    )
    writes = []
    monkeypatch.setattr(generation.state, "reusable", lambda config: reuse)
    monkeypatch.setattr(
        generation.state, "write_rows", lambda *a: writes.append(1) or kv.write_rows(*a)
    )
    together = []  # rows per weaver pass: several rows weaving at one step share one
    weave_pass = generation._Run._weave_pass
    monkeypatch.setattr(
        generation._Run,
        "_weave_pass",
        lambda run, kind, index, unread: (
            together.append(len(index)) or weave_pass(run, kind, index, unread)
        ),
    )
    mg = _diverse(make_memgen(kind, weaver_kind))
    cfg = GenerationConfig(max_new_tokens=40, memory="weaver")
    enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
    # Make one row finish early: its 5th token becomes EOS (stopping only, logits unchanged).
    probe = generate(mg, enc["input_ids"], enc["attention_mask"], cfg)
    mg.tokenizer.eos_token = mg.tokenizer.convert_ids_to_tokens(probe.tokens[1][4])
    out = _compare(mg, cfg)
    steps = {(i.row, i.token_index) for i in out.trace.insertions if i.kind == "inference"}
    per_row = [sorted(t for r, t in steps if r == row) for row in range(len(PROMPTS))]
    assert any(out.finished) and not all(out.finished), "some rows must finish early"
    assert len({tuple(p) for p in per_row}) > 1, "rows must weave at different steps"
    assert max(len(p) for p in per_row) == mg.cfg.max_inference_insertions  # the cap binds
    assert bool(writes) == reuse  # the reuse path really ran (or really did not)
    assert max(together) > 1 and min(together) == 1  # both weaver paths ran
    assert any(waited) == defer


def _undecided_trigger(mg):
    """``mg`` with its trigger marked trained and the head's last bias zero: probabilities
    spread around 0.5, so rows decide differently."""
    with torch.no_grad():
        mg.trigger.trained.fill_(True)
        mg.trigger.head[2].bias.fill_(0.0)
    return mg


def test_cached_generation_with_trained_trigger_equals_reference():
    mg = _undecided_trigger(_diverse(make_memgen("llama")))
    out = _compare(mg, GenerationConfig(max_new_tokens=24, memory="full"))
    probs = [i.trigger_prob for i in out.trace.insertions if i.kind == "inference"]
    assert probs and all(p >= 0.5 for p in probs)


def test_memory_off_equals_hf_generate():
    mg = make_memgen("llama")
    plain, tok = make_model("llama")
    enc = encode_prompts(tok, PROMPTS, "cpu")
    ours = generate(
        mg,
        enc["input_ids"],
        enc["attention_mask"],
        GenerationConfig(max_new_tokens=12, memory="off"),
    )
    hf = plain.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=-1)
    prompt_len = enc["input_ids"].shape[1]
    assert ours.tokens == hf[:, prompt_len:].tolist()
    assert ours.trace.insertions == []


def test_sampling_is_seeded():
    mg = make_memgen("llama")
    enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    a = generate(mg, enc["input_ids"], enc["attention_mask"], cfg).tokens
    b = generate(mg, enc["input_ids"], enc["attention_mask"], cfg).tokens
    c = generate(
        mg,
        enc["input_ids"],
        enc["attention_mask"],
        GenerationConfig(max_new_tokens=10, temperature=1.0, seed=4),
    ).tokens
    assert a == b and a != c


def test_sampling_draws_each_token_with_its_probability_and_never_an_impossible_one():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0]])  # rows need not sum to 1
    draws = sample(probs.repeat(50_000, 1), torch.Generator().manual_seed(0)).view(-1, 2)
    freq = torch.stack([torch.bincount(draws[:, i], minlength=4) for i in range(2)]) / 50_000
    torch.testing.assert_close(freq[0], probs[0], atol=0.01, rtol=0)  # 4 sigma is 0.009
    assert freq[0, 1] == 0 and freq[1].tolist() == [0.0, 0.0, 0.0, 1.0]
    # u at its extremes: 0 and just below the total still land on possible tokens
    cdf_edges = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    assert set(sample(cdf_edges.repeat(10_000, 1)).tolist()) == {1, 3}


def test_pass_groups_trade_a_pass_against_padding():
    assert pass_groups([40, 3, 5, 38], fixed=16) == [[1, 2], [3, 0]]  # 26 + 96 < 176 in one
    assert pass_groups([40, 3, 5, 38], fixed=200) == [[1, 2, 3, 0]]  # a pass costs too much
    assert pass_groups([7, 7, 7], fixed=0) == [[0, 1, 2]]  # no padding to save: one pass
    assert pass_groups([1, 100], fixed=0) == [[0], [1]]
    assert pass_groups([], fixed=16) == []


def _training_batch(
    mg, prompts=("hi", "hello there"), answers=("ab, cd. ef, gh.", "x, y."), last=(1,)
):
    """Two right-padded SFT rows: a prompt point per row; inference points 2, 6 and 10 tokens
    into the first answer and ``last`` into the second."""
    tok = mg.tokenizer
    tok.padding_side = "right"
    prompts = chats(*prompts)
    heads = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    enc = tok(
        [h + a + tok.eos_token for h, a in zip(heads, answers, strict=True)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    plen = [len(tok(h, add_special_tokens=False)["input_ids"]) for h in heads]
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for b, p in enumerate(plen):
        labels[b, :p] = -100
    points = Points(
        [p - 1 for p in plen],
        [[plen[0] + 2, plen[0] + 6, plen[0] + 10], [plen[1] + i for i in last]],
    )
    return enc["input_ids"], enc["attention_mask"], labels, points


@pytest.mark.parametrize("official", [True, False], ids=["official-calls", "lean"])
@pytest.mark.parametrize("kind,weaver_kind", [("llama", None), ("qwen2", None), ("llama", "qwen2")])
def test_training_forward_equals_reference(kind, weaver_kind, official):
    mg = make_memgen(kind, weaver_kind)
    batch = _training_batch(mg)
    mg.set_trainable(weaver=True, trigger=False)
    fast, g_fast = forward_and_grads(mg, weave_forward, batch)
    reference = functools.partial(reference_weave_forward, official=official)
    ref, g_ref = forward_and_grads(mg, reference, batch)
    assert abs(fast.loss.item() - ref.loss.item()) < 1e-4
    mask = batch[1].bool()
    torch.testing.assert_close(fast.logits[mask], ref.logits[mask], atol=1e-4, rtol=0)
    # Every weaver tensor is reached, on both paths.
    assert g_fast.keys() == g_ref.keys() == mg.weaver_parameters().keys()
    for name, grad in g_ref.items():
        assert grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(g_fast[name], grad, atol=1e-4, rtol=0, msg=name)


def test_training_forward_without_points_equals_plain_loss():
    mg = make_memgen("llama")
    plain, _ = make_model("llama")
    ids, mask, labels, _ = _training_batch(mg)
    out = weave_forward(mg, ids, mask, labels, Points(None, [[], []]))
    torch.testing.assert_close(
        out.loss, plain(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=1e-5, rtol=0
    )


def test_zero_prompt_latents_turns_the_prompt_insertion_off():
    mg = _diverse(make_memgen("llama", prompt_latents=0))
    out = _compare(mg, GenerationConfig(max_new_tokens=16, memory="weaver"))
    assert out.trace.insertions and all(i.kind == "inference" for i in out.trace.insertions)


def embedded_paths_agree(mg):
    """On the embedded model: cached generation gives the reference's tokens (logits 1e-3, 30
    layers in float32) with at least two weaves, and the training forward's loss the
    reference's (1e-3); returns that loss."""
    prompts = [[{"role": "user", "content": "Tom has 3 apples, and buys 4 more. How many?"}]]
    enc = encode_prompts(mg.tokenizer, prompts, "cpu")
    gen = GenerationConfig(max_new_tokens=16, memory="weaver")
    fast = generate(mg, enc["input_ids"], enc["attention_mask"], gen, keep_logits=True)
    ref = reference_generate(mg, enc["input_ids"], enc["attention_mask"], gen)
    assert fast.tokens == ref.tokens and len(fast.trace.insertions) >= 2
    for step, logits in enumerate(ref.step_logits[0]):
        torch.testing.assert_close(fast.step_logits[step][0], logits, atol=1e-3, rtol=0)
    batch = _training_batch(
        mg,
        ["Tom has 3 apples and buys 4 more. How many?", "What is 2 + 2?"],
        ["3 plus 4 is 7, so Tom has 7 apples. The answer is 7.", "2 + 2 = 4. So 4."],
        last=(3,),
    )
    with torch.no_grad():
        a = weave_forward(mg, *batch)
        b = reference_weave_forward(mg, *batch, official=False)
    assert abs(float(a.loss) - float(b.loss)) < 1e-3
    return a, batch
