"""Training throughput of the batched cached SFT forward vs the per-sample reference forward.

Embedded model (SmolLM2-135M), batch 4 of GSM8K-length samples (real GSM8K train problems from
../shared/data/gsm8k/train.jsonl when present, else gsm_symbolic), a prompt insertion plus 5
inference insertions per sample. One training step = forward + backward + AdamW step over the
weaver's tensors. Both paths run in this process on the same batches, alternating, after one
warm-up step each. Prints one JSON object.

    .venv/bin/python benchmarks/sft.py [--steps 3] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memgen_cli.config import MemoryConfig
from memgen_cli.data import get_task
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import Points, reference_weave_forward, weave_forward
from memgen_cli.training_data import SFTCollator, encode_examples

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def batches(model, n_batches: int, batch: int, insertions: int):
    task = get_task(str(GSM8K)) if GSM8K.exists() else get_task("gsm_symbolic")
    examples = task.load("train", limit=8 * n_batches * batch, seed=None)
    encoded, _ = encode_examples(model, examples, "", None, max_length=1024)
    # Keep samples that really get every inference insertion.
    encoded = [e for e in encoded if len(e.candidates) >= insertions][: n_batches * batch]
    collate = SFTCollator(model.tokenizer.pad_token_id, "first", insertions, prompt_insertion=True)
    out = [collate(encoded[i : i + batch]) for i in range(0, len(encoded), batch)]
    return out, task.name


def train_loss(fn, model, b) -> torch.Tensor:
    points = Points(b["prompt_points"], b["inference_points"])
    return fn(model, b["input_ids"], b["attention_mask"], b["labels"], points).loss


def train_step(fn, model, opt, b) -> None:
    train_loss(fn, model, b).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--insertions", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base("smollm2-135m", device="cpu")
    cfg = MemoryConfig(max_inference_insertions=args.insertions, lora_dropout=0.0)
    model = MemGenModel(base.model, base.tokenizer, cfg)
    model.set_trainable(weaver=True, trigger=False)
    data, source = batches(model, args.steps + 1, args.batch, args.insertions)

    # Same weights, same batch: the two losses must agree (gradients are checked in tests).
    model.eval()
    diffs = []
    with torch.no_grad():
        for b in data[:2]:
            fast = train_loss(weave_forward, model, b)
            ref = train_loss(reference_weave_forward, model, b)
            diffs.append(abs(float(fast) - float(ref)))
    model.train()
    # lr 0: the weights stay put, so both paths time the same computation on every step.
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.0)
    paths = {"batched": weave_forward, "reference": reference_weave_forward}
    seconds = dict.fromkeys(paths, 0.0)
    for fn in paths.values():
        train_step(fn, model, opt, data[0])  # warm-up
    for b in data[1:]:
        for name, fn in paths.items():
            start = time.perf_counter()
            train_step(fn, model, opt, b)
            seconds[name] += time.perf_counter() - start
    samples = sum(b["input_ids"].shape[0] for b in data[1:])
    rate = {k: samples / v for k, v in seconds.items()}
    tokens = [int(b["attention_mask"].sum()) / b["input_ids"].shape[0] for b in data[1:]]
    print(
        json.dumps(
            {
                "benchmark": "sft_train_step",
                "model": "smollm2-135m",
                "data": source,
                "batch": args.batch,
                "timed_steps": len(data) - 1,
                "mean_tokens_per_sample": round(sum(tokens) / len(tokens), 1),
                "insertions_per_sample": {"prompt": 1, "inference": args.insertions},
                "latents": {"prompt": cfg.prompt_latents, "inference": cfg.inference_latents},
                "threads": torch.get_num_threads(),
                "samples_per_s": {k: round(v, 3) for k, v in rate.items()},
                "speedup_vs_reference": round(rate["batched"] / rate["reference"], 2),
                "loss_max_abs_diff": max(diffs),
            }
        )
    )


if __name__ == "__main__":
    main()
