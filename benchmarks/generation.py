"""Generation speed and memory of the cached weave-aware path, as ratios in one run.

Run: .venv/bin/python benchmarks/generation.py [--tokens 256] [--batch 8] [--skip-reference]

Embedded SmolLM2-135M, 8 GSM8K-style prompts, 256 new tokens, greedy, EOS ignored (every path
does the same work), memory ``weaver`` with K=8 and at most 5 inference insertions (untrained
weaver: its values do not change the cost). Prints one JSON object:

- ratio_vs_hf_generate: our wall time / HF ``model.generate`` (memory off, same prompts);
- ratio_reference_vs_hf_generate: the reference path (no caches, per row) / HF generate;
- ratio_off_vs_hf_generate: our path with memory off / HF generate (loop overhead alone);
- tokens_identical: fast and reference paths produce the same tokens;
- the cost of memory beside a LoRA baseline (the reasoner with a LoRA adapter at the weaver's
  trainable-parameter budget, as ``memgen baseline sft`` makes it): ``lora_merged_s`` is our
  path with memory off on the merged weights (what ``memgen eval`` runs for a baseline: the
  cost of memory off), ``lora_unmerged_hf_s`` HF generate on the unmerged PEFT model;
  ``weaver_over_lora`` = weaver time / merged-LoRA time;
- peak_memory_ratio: peak RSS of a process running our generation / one running HF generate
  (each measured in its own child process, model loading included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.generation import encode_prompts, generate, reference_generate
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages.baseline import matched_rank, weaver_trainable_params

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
FALLBACK = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
]


def prompts(n: int) -> list[list[dict]]:
    if GSM8K.exists():
        questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:n]]
    else:
        questions = (FALLBACK * n)[:n]
    return [
        [{"role": "user", "content": q + "\nPut your answer within \\boxed{}."}] for q in questions
    ]


def build(batch: int):
    torch.manual_seed(0)
    base = load_base(device="cpu")
    enc = encode_prompts(base.tokenizer, prompts(batch), "cpu")
    return base, enc


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def hf_generate(base, enc, tokens):
    return base.model.generate(
        **enc,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=base.tokenizer.pad_token_id,
    )


def lora_times(enc, tokens: int, memory: MemoryConfig) -> dict:
    """Generation time of a LoRA baseline at the weaver's budget: unmerged (HF generate on the
    PEFT model) and merged (our path, memory off, as eval runs a baseline)."""
    base = load_base(device="cpu")
    rank = matched_rank(
        base.model, memory.lora_targets, weaver_trainable_params(base.model, memory)
    )
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=memory.lora_targets)
    peft = get_peft_model(base.model, cfg).eval()
    with torch.no_grad():
        _, unmerged = timed(
            lambda: peft.generate(
                **enc,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=base.tokenizer.pad_token_id,
            )
        )
        merged_model = peft.merge_and_unload()
        mg = MemGenModel(merged_model, base.tokenizer, memory).eval()
        off = GenerationConfig(tokens, memory="off", ignore_eos=True)
        _, merged = timed(lambda: generate(mg, enc["input_ids"], enc["attention_mask"], off))
    return {
        "lora_rank": rank,
        "lora_unmerged_hf_s": round(unmerged, 3),
        "lora_merged_s": round(merged, 3),
    }


def child(kind: str, tokens: int, batch: int) -> None:
    """Measure peak RSS of one way of generating, in a fresh process."""
    torch.set_num_threads(1)
    base, enc = build(batch)
    if kind == "hf":
        hf_generate(base, enc, tokens)
    else:
        mg = MemGenModel(base.model, base.tokenizer, MemoryConfig(max_inference_insertions=5))
        generate(
            mg,
            enc["input_ids"],
            enc["attention_mask"],
            GenerationConfig(tokens, memory="weaver", ignore_eos=True),
        )
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss(kind: str, tokens: int, batch: int) -> int:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--tokens",
        str(tokens),
        "--batch",
        str(batch),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--child", choices=["hf", "memgen"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.batch)

    base, enc = build(args.batch)
    mg = MemGenModel(base.model, base.tokenizer, MemoryConfig(max_inference_insertions=5)).eval()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    weaver = GenerationConfig(args.tokens, memory="weaver", ignore_eos=True)
    off = GenerationConfig(args.tokens, memory="off", ignore_eos=True)
    with torch.no_grad():
        hf_generate(base, enc, 8)  # warm-up
        with mg.weaver_adapter():  # HF generate must see the plain model: adapters off
            pass
        _, t_hf = timed(lambda: hf_generate(base, enc, args.tokens))
        _, t_off = timed(lambda: generate(mg, ids, mask, off))
        fast, t_fast = timed(lambda: generate(mg, ids, mask, weaver))
        _, t_hf2 = timed(lambda: hf_generate(base, enc, args.tokens))
    t_hf = min(t_hf, t_hf2)
    result = {
        "batch": args.batch,
        "new_tokens": args.tokens,
        "insertions": len(fast.trace.insertions),
        "hf_generate_s": round(t_hf, 3),
        "fast_weaver_s": round(t_fast, 3),
        "fast_off_s": round(t_off, 3),
        "ratio_vs_hf_generate": round(t_fast / t_hf, 3),
        "ratio_off_vs_hf_generate": round(t_off / t_hf, 3),
    }
    result.update(lora_times(enc, args.tokens, MemoryConfig(max_inference_insertions=5)))
    result["weaver_over_lora"] = round(t_fast / result["lora_merged_s"], 3)
    if not args.skip_reference:
        ref, t_ref = timed(lambda: reference_generate(mg, ids, mask, weaver))
        result["reference_s"] = round(t_ref, 3)
        result["ratio_reference_vs_hf_generate"] = round(t_ref / t_hf, 3)
        result["tokens_identical"] = ref.tokens == fast.tokens
    rss_hf, rss_mg = (
        peak_rss("hf", args.tokens, args.batch),
        peak_rss("memgen", args.tokens, args.batch),
    )
    result["peak_rss_hf_mb"] = round(rss_hf / 1024, 1)
    result["peak_rss_memgen_mb"] = round(rss_mg / 1024, 1)
    result["peak_memory_ratio"] = round(rss_mg / rss_hf, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
