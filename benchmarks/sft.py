"""Training throughput of the batched cached SFT forward vs the per-sample reference forward.

Embedded model (SmolLM2-135M), batch 4 of GSM8K-length samples (real GSM8K train problems from
../shared/data/gsm8k/train.jsonl when present, else gsm_symbolic), a prompt insertion plus 5
inference insertions per sample, batched as sft-weaver batches them (transformers'
LengthGroupedSampler, ``group_by_length: true``; ``--ungrouped`` takes consecutive samples). One
training step = forward + backward + AdamW step over the weaver's tensors. Both paths run in this
process on the same batches, alternating, after one warm-up step each. Prints one JSON object.

The reference makes the official code's calls (the weaver's whole causal LM at every point, the
reasoner's logits over the whole stream: vocabulary projections of every position, thrown away
outside the labelled tokens); ``lean_reference`` is the same per-sample computation without
those projections, so ``speedup_vs_lean_reference`` is what re-reading prefixes and going sample
by sample cost alone.

``token_passes`` counts the positions each path runs through a transformer (weaver + reasoner)
in the forward pass; ``batched_without_padding`` is the batched path with no padding at all.
``vocab_rows`` counts the positions each path projects onto the vocabulary.

The cost of memory: ``lora`` is a plain LoRA-SFT step of the reasoner (a second copy of it, with
a LoRA adapter on q_proj/v_proj at the weaver's trainable-parameter budget, as ``memgen baseline
sft`` chooses it) on the identical batches, projecting only the labelled positions as the
batched path does; ``weaver_over_lora_step`` is the batched weaver step's time over it, and
``kv_over_lora_step`` the same for a ``memory.inject: kv`` weaver (a third copy of the reasoner,
the same memory settings otherwise; its trainable count, without the projections, is reported
with the LoRA rank that would match it); ``inputp_over_lora_step`` the same for the input weaver
with ``memory.kv_prefix`` (a learned key and value per layer at the latents' slots, the weaver's
LoRA rank lowered from 16 to 13 to pay for it, as the results table's recipe does).
``kvc_over_lora_step`` and ``inputpc_over_lora_step``: the kv weaver and the input + prefix
weaver with ``memory.weaver_reads: cache`` (its query latents read the reasoner's own cache, so
the context runs through the model once; the input weaver's LoRA rank raised to 19 to pay for
the input projection it no longer has, as the deep table's row does).
``memory_mb`` is each step's peak: on CUDA the allocator's peak during the step; everywhere the
tensors autograd saves for the backward (activations, not weights), which is what differs
between the paths. On a CPU, where a
token costs about the same alone as in a batch of 4, the speedup over the lean reference cannot
exceed ``token_pass_ratio_without_padding`` by more than what the no-grad prompt block saves in
the backward.

    .venv/bin/python benchmarks/sft.py [--steps 3] [--batch 4] [--ungrouped] [--device cuda]
        [--skip-reference] [--skip-kv] [--skip-inputp] [--skip-cache]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers.trainer_pt_utils import LengthGroupedSampler

from memgen_cli.config import MemoryConfig
from memgen_cli.data import get_task
from memgen_cli.models.base import load_base
from memgen_cli.models.latents import align_offsets
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import Points, weave_forward
from memgen_cli.models.training_reference import reference_weave_forward
from memgen_cli.stages.baseline import matched_rank, weaver_trainable_params
from memgen_cli.training.sft_data import SFTCollator, encode_examples

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def batches(model, n_batches: int, batch: int, insertions: int, grouped: bool):
    """Training batches as sft-weaver forms them: length-grouped (or plain consecutive)."""
    task = get_task(str(GSM8K)) if GSM8K.exists() else get_task("gsm_symbolic")
    pool = 50 * batch  # one LengthGroupedSampler mega-batch
    examples = task.load("train", limit=2 * pool, seed=None)
    encoded, _ = encode_examples(model, examples, "", None, max_length=1024)
    # Keep samples that really get every inference insertion.
    encoded = [e for e in encoded if len(e.candidates) >= insertions][:pool]
    if grouped:
        order = LengthGroupedSampler(
            batch,
            lengths=[len(e.input_ids) for e in encoded],
            generator=torch.Generator().manual_seed(0),
        )
        encoded = [encoded[i] for i in order]
    encoded = encoded[: n_batches * batch]
    collate = SFTCollator(model.tokenizer.pad_token_id, "first", insertions, prompt_insertion=True)
    out = [collate(encoded[i : i + batch]) for i in range(0, len(encoded), batch)]
    return [to_device(b, model.device) for b in out], task.name


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_passes(batch, k: int) -> dict[str, int]:
    """Forward positions through weaver and reasoner: batched, batched without any padding
    (the most a batched path can save on a CPU, where a token costs the same in any batch),
    and the reference."""
    rows = len(batch["inference_points"])
    pts = [[p, *q] for p, q in zip(batch["prompt_points"], batch["inference_points"], strict=True)]
    lengths = batch["attention_mask"].sum(1).tolist()
    latents = [k * len(p) for p in pts]
    weaver, consumed = 0, [-1] * rows
    for r in range(
        max(map(len, pts))
    ):  # a round: the longest new chunk + carried latents + queries
        spans = [pts[b][r] - consumed[b] if r < len(pts[b]) else 0 for b in range(rows)]
        weaver += rows * (max(spans) + k + (k if r else 0))
        consumed = [pts[b][r] if r < len(pts[b]) else consumed[b] for b in range(rows)]
    offsets = align_offsets(pts, batch["input_ids"].shape[1])
    width = max(o + n + m for o, n, m in zip(offsets, lengths, latents, strict=True))
    unpadded = sum(
        p[-1] + 1 + k * (2 * len(p) - 1) + n + m
        for p, n, m in zip(pts, lengths, latents, strict=True)
    )
    reference = sum(p + 1 + k * (j + 1) for row in pts for j, p in enumerate(row))
    reference += sum(n + m for n, m in zip(lengths, latents, strict=True))
    return {
        "batched": weaver + rows * width,
        "batched_without_padding": unpadded,
        "reference": int(reference),
    }


def vocab_rows(batch) -> dict[str, int]:
    """Positions projected onto the vocabulary: the labelled tokens (batched, lean reference),
    or every weaver and reasoner position (the official calls of the reference)."""
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    return {"batched": labelled, "lean_reference": labelled}


def train_loss(fn, model, b) -> torch.Tensor:
    points = Points(b["prompt_points"], b["inference_points"])
    return fn(model, b["input_ids"], b["attention_mask"], b["labels"], points).loss


def lora_model(cfg: MemoryConfig, device: str):
    """A second reasoner with a plain LoRA adapter at the weaver's trainable-parameter budget."""
    reasoner = load_base("smollm2-135m", device=device).model
    rank = matched_rank(reasoner, cfg.lora_targets, weaver_trainable_params(reasoner, cfg))
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=cfg.lora_targets
    )
    return get_peft_model(reasoner, lora), rank


def lora_loss(model, b) -> torch.Tensor:
    """Plain causal-LM loss of the adapted reasoner, projecting only labelled positions."""
    lm = model.base_model.model
    hidden = lm.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    labels = b["labels"][:, 1:]
    keep = labels != -100
    logits = lm.lm_head(hidden.last_hidden_state[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def train_step(fn, model, opt, b) -> None:
    loss = lora_loss(model, b) if fn is None else train_loss(fn, model, b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()  # time the work, not its launch


def ratio(rate: dict, a: str, b: str) -> float | None:
    return round(rate[a] / rate[b], 2) if b in rate else None


def step_memory_mb(fn, model, b) -> float:
    """Peak memory of one forward + backward: the CUDA allocator's peak above its start, or
    (CPU) the bytes of the tensors autograd saves for the backward, weights excluded."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        (lora_loss(model, b) if fn is None else train_loss(fn, model, b)).backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            sizes.append(t.untyped_storage().nbytes())
        return t

    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lora_loss(model, b) if fn is None else train_loss(fn, model, b)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(sizes) / 2**20


def weaver_step(base, cfg: MemoryConfig) -> tuple:
    """(forward, model, optimizer) of a further weaver on its own copy of the reasoner, in
    training mode; lr 0, as every path here."""
    model = MemGenModel(base.model, base.tokenizer, cfg)
    model.set_trainable(weaver=True, trigger=False)
    model.train()
    return weave_forward, model, torch.optim.AdamW(model.trainable_parameters(), lr=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--insertions", type=int, default=5)
    parser.add_argument(
        "--ungrouped",
        action="store_true",
        help="consecutive samples instead of sft-weaver's length-grouped batches",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:i] | auto")
    parser.add_argument("--skip-kv", action="store_true", help="leave out the kv weaver step")
    parser.add_argument(
        "--skip-inputp", action="store_true", help="leave out the input + prefix weaver step"
    )
    parser.add_argument(
        "--skip-cache",
        action="store_true",
        help="leave out the two weaver steps that read the cache (memory.weaver_reads: cache)",
    )
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="time only the batched weaver step and the LoRA step (the cost of memory)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base("smollm2-135m", device=args.device)
    cfg = MemoryConfig(max_inference_insertions=args.insertions, lora_dropout=0.0)
    model = MemGenModel(base.model, base.tokenizer, cfg)
    model.set_trainable(weaver=True, trigger=False)
    data, source = batches(model, args.steps + 1, args.batch, args.insertions, not args.ungrouped)

    lean = functools.partial(reference_weave_forward, official=False)
    paths = {"batched": weave_forward, "reference": reference_weave_forward, "lean_reference": lean}
    if args.skip_reference:
        paths = {"batched": weave_forward}
    # Same weights, same batch: the losses must agree (gradients are checked in tests).
    model.eval()
    diffs = []
    with torch.no_grad():
        for b in data[:2]:
            fast = float(train_loss(weave_forward, model, b))
            diffs += [abs(fast - float(train_loss(paths[k], model, b))) for k in paths]
    model.train()
    lora, rank = lora_model(cfg, args.device)
    lora.train()
    # lr 0: the weights stay put, so every path times the same computation on every step.
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.0)
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=0.0)
    steps = {name: (fn, model, opt) for name, fn in paths.items()}
    steps["lora"] = (None, lora, lora_opt)
    if not args.skip_kv:
        kv_cfg = dataclasses.replace(cfg, inject="kv")
        kv_base = load_base("smollm2-135m", device=args.device)
        kv_budget = weaver_trainable_params(kv_base.model, kv_cfg)  # before LoRA wraps it
        kv_rank = matched_rank(kv_base.model, kv_cfg.lora_targets, kv_budget)
        steps["batched_kv"] = weaver_step(kv_base, kv_cfg)
        kv_model = steps["batched_kv"][1]
    if not args.skip_inputp:
        inputp_cfg = dataclasses.replace(cfg, kv_prefix=True, lora_r=13, lora_alpha=26)
        steps["batched_inputp"] = weaver_step(
            load_base("smollm2-135m", device=args.device), inputp_cfg
        )
        inputp = steps["batched_inputp"][1]
    cached = {
        "batched_kvc": dataclasses.replace(cfg, inject="kv", weaver_reads="cache"),
        "batched_inputpc": dataclasses.replace(
            cfg, kv_prefix=True, lora_r=19, lora_alpha=38, weaver_reads="cache"
        ),
    }
    for name, c in {} if args.skip_cache else cached.items():
        steps[name] = weaver_step(load_base("smollm2-135m", device=args.device), c)
    seconds = dict.fromkeys(steps, 0.0)
    for fn, m, o in steps.values():
        train_step(fn, m, o, data[0])  # warm-up
    for b in data[1:]:
        for name, (fn, m, o) in steps.items():
            start = time.perf_counter()
            train_step(fn, m, o, b)
            seconds[name] += time.perf_counter() - start
    memory = {name: round(step_memory_mb(fn, m, data[1]), 1) for name, (fn, m, _) in steps.items()}
    samples = sum(b["input_ids"].shape[0] for b in data[1:])
    passes = [token_passes(b, cfg.inference_latents) for b in data[1:]]
    work = {k: sum(p[k] for p in passes) for k in passes[0]}
    vocab = {k: sum(vocab_rows(b)[k] for b in data[1:]) for k in ("batched", "lean_reference")}
    vocab["reference"] = work["reference"]  # the official calls project every position
    rate = {k: samples / v for k, v in seconds.items()}
    tokens = [int(b["attention_mask"].sum()) / b["input_ids"].shape[0] for b in data[1:]]
    print(
        json.dumps(
            {
                "benchmark": "sft_train_step",
                "model": "smollm2-135m",
                "data": source,
                "batch": args.batch,
                "batching": "consecutive" if args.ungrouped else "length-grouped (as sft-weaver)",
                "timed_steps": len(data) - 1,
                "mean_tokens_per_sample": round(sum(tokens) / len(tokens), 1),
                "insertions_per_sample": {"prompt": 1, "inference": args.insertions},
                "latents": {"prompt": cfg.prompt_latents, "inference": cfg.inference_latents},
                "device": str(model.device),
                "threads": torch.get_num_threads(),
                "samples_per_s": {k: round(v, 3) for k, v in rate.items()},
                "speedup_vs_reference": ratio(rate, "batched", "reference"),
                "speedup_vs_lean_reference": ratio(rate, "batched", "lean_reference"),
                "weaver_over_lora_step": round(seconds["batched"] / seconds["lora"], 2),
                "kv_over_lora_step": None
                if args.skip_kv
                else round(seconds["batched_kv"] / seconds["lora"], 2),
                "kv": None
                if args.skip_kv
                else {
                    "weaver_trainable_params": sum(
                        p.numel() for p in kv_model.trainable_parameters()
                    ),
                    "matched_lora_rank": kv_rank,
                },
                "inputp_over_lora_step": None
                if args.skip_inputp
                else round(seconds["batched_inputp"] / seconds["lora"], 2),
                "inputp_trainable_params": None
                if args.skip_inputp
                else sum(p.numel() for p in inputp.trainable_parameters()),
                **{
                    f"{name[len('batched_') :]}_over_lora_step": None
                    if name not in seconds
                    else round(seconds[name] / seconds["lora"], 2)
                    for name in cached
                },
                **{
                    f"{name[len('batched_') :]}_trainable_params": None
                    if name not in steps
                    else sum(p.numel() for p in steps[name][1].trainable_parameters())
                    for name in cached
                },
                "lora": {
                    "rank": rank,
                    "trainable_params": sum(
                        p.numel() for p in lora.parameters() if p.requires_grad
                    ),
                    "weaver_trainable_params": sum(p.numel() for p in model.trainable_parameters()),
                },
                "memory_mb": memory,
                "memory_measure": "cuda peak allocated"
                if model.device.type == "cuda"
                else "saved for backward (activations)",
                "weaver_over_lora_memory": round(memory["batched"] / max(memory["lora"], 1e-9), 2),
                "token_passes": work,
                "token_pass_ratio": round(work["reference"] / work["batched"], 2),
                "vocab_rows": vocab,
                "token_pass_ratio_without_padding": round(
                    work["reference"] / work["batched_without_padding"], 2
                ),
                "loss_max_abs_diff": max(diffs),
            }
        )
    )


if __name__ == "__main__":
    main()
