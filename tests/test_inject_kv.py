"""``memory.inject: kv``: the weaver's keys and values written into the reasoner's cache.

Golden relation: with the weaver's LoRA B at zero, the weaver *is* the reasoner, so its keys
and values at the query latents are what the reasoner computes for those latents as ordinary
inputs. Every kv path (the batched training forward, cached generation) must then give the
logits of the plain reasoner over a stream with the query latents inserted as input positions.
The fast paths must also equal the slow per-row references with a non-zero LoRA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_model import PROMPTS, _compare, _diverse, _training_batch, _undecided_trigger
from transformers import LlamaConfig
from typer.testing import CliRunner

from conftest import make_memgen, make_model
from helpers import checked_kv, forward_and_grads, save_tiny_base, tiny_artifact
from memgen_cli.artifacts import load_artifact
from memgen_cli.cli import app
from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.errors import MemgenError
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.models import kv, training_reference
from memgen_cli.models import memgen as memgen_module
from memgen_cli.models.memgen import MemGenModel, check_inject
from memgen_cli.models.training import IGNORE, Points, weave_forward
from memgen_cli.models.training_reference import reference_weave_forward
from memgen_cli.training.rollouts import policy_inputs, policy_logprobs, rollout

KINDS = ["llama", "qwen2"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def kv_memgen(kind="llama", zero_b=False, **memory) -> MemGenModel:
    return checked_kv(make_memgen(kind, inject="kv", **memory), zero_b)


@torch.no_grad()
def plain_logits(mg: MemGenModel, ids: list[int], after: dict[int, str]) -> torch.Tensor:
    """The plain reasoner over ``ids`` with K query latents of ``after[i]`` as ordinary input
    positions right after token i; the logits at each token's own column (len(ids), V)."""
    tokens = mg.embed(torch.tensor([ids]))
    pieces, columns, col = [], [], 0
    for i in range(len(ids)):
        pieces.append(tokens[:, i : i + 1])
        columns.append(col)
        col += 1
        if i in after:
            queries = mg.weaver.query_embeds(after[i], 1).to(tokens.dtype)
            pieces.append(queries)
            col += queries.shape[1]
    stream = torch.cat(pieces, 1)
    mask = torch.ones(stream.shape[:2], dtype=torch.long)
    hidden = mg.reasoner_hidden(stream, mask, torch.arange(stream.shape[1])[None])
    return mg.lm_head(hidden[0, columns])


# ------------------------------------------------------------------ the golden relation
def training_against(mg, golden=plain_logits, atol=1e-5) -> list[tuple]:
    """The training forward's logits on ``_training_batch`` against ``golden(mg, ids, after)``
    for every row (``atol``); each row's (ids, after, golden logits), for further checks."""
    ids, mask, labels, points = _training_batch(mg)
    with torch.no_grad():
        out = weave_forward(mg, ids, mask, labels, points, return_logits=True)
    rows = []
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        after = {points.prompt[b]: "prompt", **{p: "inference" for p in points.inference[b]}}
        want = golden(mg, ids[b, real].tolist(), after)
        torch.testing.assert_close(out.logits[b, real], want, atol=atol, rtol=0)
        rows.append((ids[b, real].tolist(), after, want))
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_zero_lora_b_training_forward_equals_queries_as_ordinary_inputs(kind):
    training_against(kv_memgen(kind, zero_b=True))


def _generation_against_plain(mg, cfg, keep=None, golden=plain_logits, atol=1e-5):
    """Cached generation against ``golden`` (by default the plain reasoner over prompt, tokens
    and the query latents of every insertion that was inserted, 1e-5); returns the generation."""
    enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True, keep=keep)
    for row in range(len(PROMPTS)):
        prompt = enc["input_ids"][row, enc["attention_mask"][row].bool()].tolist()
        ids = prompt + out.tokens[row]
        after = {len(prompt) - 1 + i.token_index: i.kind for i in out.trace.for_row(row)}
        want = golden(mg, ids, after)
        for step in range(len(out.tokens[row])):  # token `step` is predicted at column before
            got = out.step_logits[step][row]
            torch.testing.assert_close(got, want[len(prompt) - 1 + step], atol=atol, rtol=0)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_zero_lora_b_generation_equals_queries_as_ordinary_inputs(kind):
    mg = _diverse(kv_memgen(kind, zero_b=True))
    out = _generation_against_plain(mg, GenerationConfig(max_new_tokens=24, memory="weaver"))
    assert sum(i.kind == "inference" for i in out.trace.insertions) >= 4


def test_suppressed_insertions_leave_no_trace_in_the_weavers_cache():
    """A woven memory that ``keep`` drops is taken back out of the weaver's cache, so later
    weaves read only what the reasoner holds (else they differ from the plain reference)."""
    mg = _diverse(kv_memgen("llama", zero_b=True))
    firsts = set()

    def keep(ins):  # drop each row's first inference insertion
        if ins.kind == "inference" and ins.row not in firsts:
            firsts.add(ins.row)
            return False
        return True

    out = _generation_against_plain(mg, GenerationConfig(max_new_tokens=24), keep=keep)
    dropped = [i for i in out.trace.insertions if not i.inserted]
    later = [i for i in out.trace.insertions if i.inserted and i.kind == "inference"]
    assert dropped and later


def test_memory_changes_the_second_token_on_not_the_first():
    """The reasoner never runs over the slots: the token right after an insertion is predicted
    from the boundary token, before the memory; the memory changes what comes after."""
    mg = kv_memgen("llama")
    enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    on = generate(mg, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True)
    off_cfg = GenerationConfig(max_new_tokens=6, memory="off", ignore_eos=True)
    off = generate(mg, enc["input_ids"], enc["attention_mask"], off_cfg, keep_logits=True)
    torch.testing.assert_close(on.step_logits[0], off.step_logits[0], atol=1e-5, rtol=0)
    assert (on.step_logits[1] - off.step_logits[1]).abs().max() > 1e-3


# ------------------------------------------------------------ fast paths equal references
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reuse,defer", [(True, True), (False, True), (True, False)])
def test_cached_generation_equals_reference(kind, reuse, defer, monkeypatch):
    """Greedy tokens identical and logits within 1e-4 of the per-row reference, with slots
    written into masked columns and appended as new ones, with and without waiting weaves."""
    from memgen_cli import generation

    monkeypatch.setattr(generation._Run, "DEFER", defer)
    monkeypatch.setattr(generation.state, "reusable", lambda config: reuse)
    writes = []
    monkeypatch.setattr(
        generation.state, "write_slots", lambda *a: writes.append(1) or kv.write_slots(*a)
    )
    mg = _diverse(kv_memgen(kind))
    out = _compare(mg, GenerationConfig(max_new_tokens=30, memory="weaver"))
    steps = {(i.row, i.token_index) for i in out.trace.insertions if i.kind == "inference"}
    per_row = [sorted(t for r, t in steps if r == row) for row in range(len(PROMPTS))]
    assert len({tuple(p) for p in per_row}) > 1, "rows must weave at different steps"
    assert bool(writes) == reuse
    assert all(i.latents.shape == (i.weaver_states.shape[0], 0) for i in out.trace.insertions)


def test_cached_generation_with_trained_trigger_equals_reference():
    mg = _undecided_trigger(_diverse(kv_memgen("qwen2")))
    out = _compare(mg, GenerationConfig(max_new_tokens=24, memory="full"))
    assert any(i.kind == "inference" for i in out.trace.insertions)


def test_shared_prompt_rollouts_equal_unshared_ones():
    """``repeat=G`` copies each prompt's caches, the weaver's memory slots included."""
    mg = _diverse(kv_memgen("llama"))
    enc = encode_prompts(mg.tokenizer, PROMPTS[:2], "cpu")
    ids, mask = (t.repeat_interleave(3, 0) for t in (enc["input_ids"], enc["attention_mask"]))
    cfg = GenerationConfig(max_new_tokens=16)
    shared = generate(mg, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True, repeat=3)
    alone = generate(mg, ids, mask, cfg, keep_logits=True)
    assert shared.tokens == alone.tokens
    assert sum(i.kind == "inference" for i in shared.trace.insertions) >= 3
    for a, b in zip(shared.step_logits, alone.step_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "v_proj"]])
def test_training_forward_equals_reference(kind, targets):
    mg = kv_memgen(kind, lora_targets=targets)
    batch = _training_batch(mg)
    mg.set_trainable(weaver=True, trigger=False)
    fast, g_fast = forward_and_grads(mg, weave_forward, batch)
    ref, g_ref = forward_and_grads(mg, reference_weave_forward, batch)
    assert abs(fast.loss.item() - ref.loss.item()) < 1e-4
    mask = batch[1].bool()
    torch.testing.assert_close(fast.logits[mask], ref.logits[mask], atol=1e-4, rtol=0)
    assert g_fast.keys() == g_ref.keys()
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, atol=1e-4, rtol=0, msg=name)
    # Every layer's k/v LoRA is reached; only the last layer's other LoRA is not (nothing reads
    # that layer's output at the slots).
    last = mg.reasoner.config.num_hidden_layers - 1
    for name, grad in g_ref.items():
        reached = grad.abs().max() > 0
        idle = f"layers.{last}." in name and not ("k_proj" in name or "v_proj" in name)
        assert reached != idle, name


# --------------------------------------------------------------------- the position invariant
def test_slots_at_shifted_positions_are_refused_and_would_change_the_result(monkeypatch):
    mg = _diverse(kv_memgen("llama", zero_b=True))
    ids, mask, labels, points = _training_batch(mg)
    real = mask[0].bool()
    after = {points.prompt[0]: "prompt", **{p: "inference" for p in points.inference[0]}}
    want = plain_logits(mg, ids[0, real].tolist(), after)
    kinds = ["prompt"] + ["inference"] * len(points.inference[0])

    def reference_logits():
        tokens = mg.embed(ids[0, real][None])
        with torch.no_grad():
            hidden = training_reference._reference_hidden_kv(mg, tokens, sorted(after), kinds)
        return mg.lm_head(hidden)

    torch.testing.assert_close(reference_logits(), want, atol=1e-5, rtol=0)
    monkeypatch.setattr(memgen_module, "latent_positions", _shift(memgen_module.latent_positions))
    with pytest.raises(RuntimeError, match="rotary"):
        reference_logits()
    with pytest.raises(RuntimeError, match="rotary"):  # generation checks every write too
        enc = encode_prompts(mg.tokenizer, PROMPTS, "cpu")
        generate(mg, enc["input_ids"], enc["attention_mask"], GenerationConfig(max_new_tokens=4))
    # ... and the check is what stands between a shift and a wrong answer: unchecked, the
    # shifted keys give other logits.
    monkeypatch.setattr(training_reference, "check_positions", lambda *a: None)
    assert (reference_logits() - want).abs().max() > 1e-3


def _shift(fn):
    def shifted(start, k):
        return fn(start + 1, k)

    return shifted


def test_check_positions():
    slots = kv.SlotKV(
        [torch.zeros(1, 2, 3, 4)], [torch.zeros(1, 2, 3, 4)], torch.tensor([[5, 6, 7]])
    )
    kv.check_positions(slots, torch.tensor([[5, 6, 7]]))
    with pytest.raises(RuntimeError, match="rotary"):
        kv.check_positions(slots, torch.tensor([[6, 7, 8]]))


# ------------------------------------------------------------------------------ training
def test_gradients_reach_the_weaver_through_a_token_far_after_the_insertion():
    mg = kv_memgen("qwen2", lora_targets=["q_proj", "k_proj", "v_proj"])
    mg.set_trainable(weaver=True, trigger=False)
    ids = torch.tensor([[5 + (i * 7) % 90 for i in range(40)]])
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE)
    labels[0, -1] = ids[0, -1]  # the loss reads one token, 30 positions after the insertion
    points = Points(None, [[8]])
    frozen = {n: p.detach().clone() for n, p in mg.reasoner.named_parameters() if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in mg.weaver_parameters().items()}
    out = weave_forward(mg, ids, mask, labels, points)
    out.loss.backward()
    grads = {n: p.grad for n, p in mg.weaver_parameters().items()}
    assert grads["weaver.queries.inference"].abs().max() > 0
    assert all(grads[n].abs().max() > 0 for n in grads if "layers.0." in n and "lora_" in n)
    assert grads["weaver.queries.prompt"] is None or grads["weaver.queries.prompt"].abs().max() == 0
    opt = torch.optim.SGD(mg.trainable_parameters(), lr=0.1)
    opt.step()
    after = dict(mg.reasoner.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    changed = [n for n, p in mg.weaver_parameters().items() if not torch.equal(p, before[n])]
    assert "weaver.queries.inference" in changed and any("lora_B" in n for n in changed)


def test_no_projections_and_an_honest_trainable_count():
    from memgen_cli.stages.baseline import weaver_trainable_params

    for targets in (["q_proj", "v_proj"], ["k_proj", "v_proj"]):
        mg = kv_memgen("llama", lora_targets=targets)
        assert mg.weaver.reasoner_to_weaver is None and mg.weaver.weaver_to_reasoner is None
        assert not any("to_" in n for n in mg.weaver.state_dict())
        mg.set_trainable(weaver=True, trigger=False)
        count = sum(p.numel() for p in mg.trainable_parameters())
        plain, _ = make_model("llama")
        assert weaver_trainable_params(plain, mg.cfg) == count
        with_projections = make_memgen("llama", lora_targets=targets)
        with_projections.set_trainable(weaver=True, trigger=False)
        hidden = plain.config.hidden_size
        assert sum(p.numel() for p in with_projections.trainable_parameters()) == count + 2 * (
            hidden * hidden + hidden
        )


# ---------------------------------------------------------------------------- refusals
def test_refusals_name_what_to_use_instead():
    with pytest.raises(MemgenError, match="inject: input"):
        make_memgen("llama", "qwen2", inject="kv")  # a separate weaver backbone
    sliding = LlamaConfig(sliding_window=16)
    with pytest.raises(MemgenError, match="sliding.*inject: input"):
        check_inject(MemoryConfig(inject="kv"), sliding, separate_weaver=False)
    check_inject(MemoryConfig(inject="input"), sliding, separate_weaver=True)  # input: fine
    with pytest.raises(MemgenError, match="input or kv"):
        check_inject(MemoryConfig(inject="deep"), sliding, separate_weaver=False)


# --------------------------------------------------------------------------- artifacts
def test_an_artifact_without_the_key_loads_as_input(tmp_path):
    base_dir, art = tiny_artifact(tmp_path)
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["memory"]["inject"] == "input"
    del manifest["memory"]["inject"]  # as written before the key existed
    (art / "memgen.json").write_text(json.dumps(manifest))
    model, _, _ = load_artifact(art, device="cpu")
    assert model.cfg.inject == "input" and not model.kv
    assert model.weaver.weaver_to_reasoner is not None


def test_a_kv_artifact_records_the_key_and_reloads_to_the_same_outputs(tmp_path):
    base_dir, art = tiny_artifact(tmp_path, inject="kv")
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["memory"]["inject"] == "kv"
    assert not any("to_" in k for k in manifest["tensors"]["weaver"])
    a, _, _ = load_artifact(art, device="cpu")
    b, _, _ = load_artifact(art, device="cpu")
    assert a.kv
    enc = encode_prompts(a.tokenizer, PROMPTS, "cpu")
    cfg = GenerationConfig(max_new_tokens=8)
    out_a = generate(a, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True)
    out_b = generate(b, enc["input_ids"], enc["attention_mask"], cfg, keep_logits=True)
    assert out_a.tokens == out_b.tokens
    torch.testing.assert_close(out_a.step_logits[-1], out_b.step_logits[-1])


# ------------------------------------------------------------------ the stages, with kv
def test_rollout_logprobs_equal_the_training_forwards():
    """GRPO's sampling log-probs (cached generation) equal its scoring pass (the training
    forward over the same points): the two kv paths agree on rollouts."""
    mg = _diverse(kv_memgen("llama"))
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.7, seed=3, memory="weaver")
    r = rollout(mg, [[m] for m in (PROMPTS[0][0], PROMPTS[2][0])], cfg, 2)
    assert r.prompt_insertion and len({tuple(p) for p in r.inference_points}) > 1
    b = policy_inputs(r, mg.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "completion_index", "completion_mask")
    mg.set_trainable(weaver=True, trigger=False)
    logps, _ = policy_logprobs(
        mg, *(b[k] for k in keys), b["prompt_points"], b["inference_points"], 0.7
    )
    real = b["completion_mask"].bool()
    assert float((logps.detach() - b["sampling_logps"]).abs()[real].max()) < 1e-4
    logps.sum().backward()
    assert mg.weaver.queries["inference"].grad.abs().sum() > 0


def sums_file(path: Path) -> Path:
    """Ten GSM8K-format sums (``question``, ``answer`` ending ``#### N``) at ``path``."""
    rows = [
        {
            "question": f"What is {a} + {a + 1}?",
            "answer": f"Add {a}, then {a + 1}.\n#### {2 * a + 1}",
        }
        for a in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny base, a small GSM8K-format file, and a kv weaver trained on it by sft-weaver."""
    tmp = tmp_path_factory.mktemp("kv-stages")
    base = save_tiny_base(tmp / "base")
    data = sums_file(tmp / "train.jsonl")
    out = tmp / "sft"
    sets = ["--set", "memory.inject=kv", "--set", "data.heldout=2"]
    result = train("sft-weaver", base, data, out, *sets)
    assert result.exit_code == 0, result.output
    return base, data, out


def memgen(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train(stage: str, base, data, out, *args):
    """``memgen STAGE`` with the stage's recipe for the tiny model, ``base``, ``data``, ``out``."""
    recipe = RECIPES / f"{stage}.yaml"
    return memgen(stage, "--recipe", recipe, "--base", base, "--data", data, "--output", out, *args)


def test_sft_weaver_writes_a_kv_artifact_without_projections(chain):
    _, _, art = chain
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["memory"]["inject"] == "kv"
    assert not any("to_" in name for name in load_file(art / "weaver.safetensors"))
    losses = [json.loads(x).get("loss") for x in (art / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] and all(
        math.isfinite(x) for x in losses if x is not None
    )
    model, _, _ = load_artifact(art, device="cpu")
    assert model.kv


def test_grpo_weaver_trains_a_kv_artifact(chain, tmp_path):
    base, data, art = chain
    out = tmp_path / "grpo"
    result = train("grpo-weaver", base, data, out, "--init", art, "--set", "training.max_steps=2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "memgen.json").read_text())["memory"]["inject"] == "kv"
    before, after = load_file(art / "weaver.safetensors"), load_file(out / "weaver.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_trigger_eval_and_generate_run_a_kv_artifact(chain, tmp_path):
    base, data, art = chain
    out = tmp_path / "trigger"
    result = train(
        "train-trigger", base, data, out, "--artifact", art, "--set", "training.temperature=1.0",
        "--set", "training.max_completion_length=24", "--set", "training.max_steps=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["trigger"]["trained"] and manifest["memory"]["inject"] == "kv"
    result = memgen(
        "eval",
        "--artifact",
        out,
        "--data",
        data,
        "--limit",
        4,
        "--max-new-tokens",
        12,
        "--memory",
        "off,weaver,full",
        "--json",
        "--output",
        tmp_path / "eval",
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [r["mode"] for r in got["results"]] == ["off", "weaver", "full"]
    result = memgen(
        "generate",
        "Hello, there. How are you?",
        "--artifact",
        art,
        "--max-new-tokens",
        12,
        "--json",
    )
    assert result.exit_code == 0, result.output
    insertions = json.loads(result.stdout)["insertions"]
    assert insertions[0]["kind"] == "prompt" and insertions[0]["num_latents"] == 2
    assert all(i["latent_norms"] is None for i in insertions)  # no input-level latents to measure
    result = memgen("generate", "Hello, there.", "--artifact", art, "--max-new-tokens", 12)
    assert result.exit_code == 0 and "⟨mem 2⟩" in result.output, result.output


def test_inspect_memory_reads_a_trained_kv_artifact(chain):
    _, _, art = chain
    result = memgen(
        "inspect-memory",
        "--artifact",
        art,
        "--prompt",
        "Hi, there.",
        "--max-new-tokens",
        12,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inject"] == "kv" and not report["views"]["logit_lens"]["applies"]
    recs = report["insertions"]
    assert recs and all(r["logit_lens"] is None and r["weaver_lens"] for r in recs)
    assert all(len(r["attention"]["per_layer"]) == 2 for r in recs if r["attention"])
