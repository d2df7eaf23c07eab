"""Independent GSM8K check of ``memgen eval``: plain transformers ``model.generate``, same grader.

Run: .venv/bin/python benchmarks/eval_gsm8k.py [--data ../shared/data/gsm8k/test.jsonl]
     [--limit 200] [--batch-size 16] [--max-new-tokens 256] [--compare runs/eval/X/predictions.jsonl]
     [--save plain.jsonl]

The embedded SmolLM2-135M-Instruct is loaded straight from its safetensors cache with
``AutoModelForCausalLM`` (no memgen model code), each question gets the suffix
"Put your answer within \\boxed{}." in the tokenizer's chat template, batches are left-padded
in file order, and decoding is greedy. Completions are graded by memgen's GSM8K task (box,
then ``#### N``, then the last number; numeric comparison). Prints one JSON object: accuracy,
n, samples/s and tokens/s; with ``--compare``, also how many completions are identical to
those in a ``memgen eval`` predictions file and both accuracies on the shared problems.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memgen_cli.data import get_task
from memgen_cli.models.base import embedded_dir

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
SUFFIX = "Put your answer within \\boxed{}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(GSM8K))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--suffix", default=SUFFIX)
    parser.add_argument("--compare", type=Path, help="predictions.jsonl from `memgen eval`")
    parser.add_argument("--save", type=Path, help="write this run's completions here (JSONL)")
    args = parser.parse_args()

    source = embedded_dir("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(source)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    task = get_task(args.data)
    examples = task.load("test", limit=args.limit)

    completions, tokens, seconds = [], 0, 0.0
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start : start + args.batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": f"{ex.question}\n{args.suffix}"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for ex in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tick = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        seconds += time.perf_counter() - tick
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            ids = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            ids = [t for t in ids if t != tok.pad_token_id]
            tokens += len(ids)
            completions.append(tok.decode(ids, skip_special_tokens=True))

    scores = [task.grade(c, ex) for c, ex in zip(completions, examples, strict=True)]
    result = {
        "what": "plain transformers model.generate, greedy, memgen GSM8K grader",
        "data": args.data,
        "n": len(examples),
        "accuracy": sum(scores) / len(scores),
        "correct": int(sum(scores)),
        "samples_per_s": len(examples) / seconds,
        "tokens_per_s": tokens / seconds,
        "generate_s": round(seconds, 1),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }
    if args.save:
        rows = [
            {"id": ex.id, "completion": c, "score": s}
            for ex, c, s in zip(examples, completions, scores, strict=True)
        ]
        args.save.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.compare:
        result["compare"] = compare(args.compare, examples, completions, scores)
    print(json.dumps(result))


def compare(path: Path, examples, completions, scores) -> dict:
    """Agreement with a memgen eval predictions file (memory off rows), matched by id."""
    if not path.is_file():
        return {"error": f"{path} not found"}
    ours = {
        r["id"]: r for r in map(json.loads, path.read_text().splitlines()) if r["mode"] == "off"
    }
    shared = [i for i, ex in enumerate(examples) if ex.id in ours]
    same = sum(ours[examples[i].id]["completion"] == completions[i] for i in shared)
    return {
        "problems": len(shared),
        "identical_completions": same,
        "accuracy_plain_transformers": sum(scores[i] for i in shared) / max(len(shared), 1),
        "accuracy_memgen_eval": sum(ours[examples[i].id]["score"] for i in shared)
        / max(len(shared), 1),
    }


if __name__ == "__main__":
    main()
