"""How much a trained weaver's prompt latents depend on the problem: their size against the
reasoner's token embeddings, and how alike they are within a task and across tasks.

For each artifact, the first ``--n`` held-out problems of each ``--data`` task are asked as
``memgen eval`` asks them (the artifact's prompt settings, and its recorded task options on its
own task); the K latents woven at the prompt of each are flattened into one vector per problem.
Printed, one JSON object:

- ``rms_over_embedding``: the latents' RMS / the RMS of the reasoner's token-embedding table,
  per task (an ordinary input position is about 1);
- ``cosine_within``: per task, the mean cosine between two different problems' latents (1.0: the
  weaver writes the same memory whatever the problem, a soft prompt in effect);
- ``cosine_across``: the mean cosine between a problem of one task and one of another;
- with ``--swap-n N``, on the artifact's own task: greedy accuracy on its first N held-out
  problems with each problem's own prompt latents, and with the latents woven for another
  problem (the batch's first: every prompt weave hands row 0's latents to every row), paired
  (``swapped - own``, s.e., exact McNemar p). No change says the reasoner uses nothing of the
  problem in its prompt memory; a cosine near 1 can still hide a small part that it reads.

    .venv/bin/python benchmarks/latent_spread.py --artifact runs/quality/weaver \\
        [--artifact runs/deep/weaver-input-lr0.003-s42] [--data gym:basic_arithmetic,gym:letter_counting] [--n 8]
        [--swap-n 200 --batch-size 50]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json

import torch
import torch.nn.functional as F

from memgen_cli.artifacts import load_artifact
from memgen_cli.config import GenerationConfig
from memgen_cli.data import get_task, to_messages
from memgen_cli.evaluation.stats import paired
from memgen_cli.generation import generate
from memgen_cli.generation.sampling import encode_prompts


def task_for(manifest: dict, spec: str):
    """The task ``spec``, with the options the artifact recorded when it is its own task."""
    training = manifest.get("training") or {}
    own = training.get("task") == spec
    return get_task(spec, **((training.get("task_options") or {}) if own else {}))


def ask(model, manifest: dict, examples, max_new_tokens: int):
    """Greedy generation with memory for ``examples``, asked as ``memgen eval`` asks them."""
    prompt = manifest.get("prompt") or {}
    messages = [
        to_messages(e, prompt.get("prompt_suffix", ""), prompt.get("system")) for e in examples
    ]
    enc = encode_prompts(model.tokenizer, messages, "cpu")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, memory="weaver", temperature=0.0)
    return generate(model, enc["input_ids"], enc["attention_mask"], cfg)


def prompt_latents(model, manifest: dict, spec: str, n: int) -> torch.Tensor:
    """(n, K * D): the prompt latents the artifact weaves for the first n held-out problems."""
    task = task_for(manifest, spec)
    out = ask(model, manifest, task.load(task.default_split, limit=n), 1)
    woven = sorted((i for i in out.trace.insertions if i.kind == "prompt"), key=lambda i: i.row)
    return torch.stack([i.latents.flatten() for i in woven])


@contextlib.contextmanager
def first_row_latents(model):
    """Within it, every prompt weave of a batch hands its first row's latents to every row
    (each row still weaves its own later insertions); the weaver's states are left as woven."""
    weave = model.weave

    def first_rows(kind, *args, **kwargs):
        latents, hidden = weave(kind, *args, **kwargs)
        if kind == "prompt" and latents.shape[0] > 1:
            latents = latents[:1].expand_as(latents).contiguous()
        return latents, hidden

    model.weave = first_rows
    try:
        yield
    finally:
        del model.weave  # the class's method again


def swap_accuracy(model, manifest: dict, n: int, batch: int, max_new_tokens: int) -> dict:
    """Accuracy on the artifact's own task with own and with row 0's prompt latents, paired."""
    spec = (manifest.get("training") or {})["task"]
    task = task_for(manifest, spec)
    examples = task.load(task.default_split, limit=n)
    solved = {}
    for name in ("own", "swapped"):
        right = []
        for start in range(0, len(examples), batch):
            chunk = examples[start : start + batch]
            with first_row_latents(model) if name == "swapped" else contextlib.nullcontext():
                out = ask(model, manifest, chunk, max_new_tokens)
            texts = model.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
            right += [task.grade(t, e) >= 1.0 for t, e in zip(texts, chunk, strict=True)]
        solved[name] = right
    return {
        "task": spec,
        "n": len(examples),
        "accuracy_own": round(100 * sum(solved["own"]) / len(examples), 1),
        "accuracy_swapped": round(100 * sum(solved["swapped"]) / len(examples), 1),
        "swapped_minus_own": paired(solved["own"], solved["swapped"]),
    }


def mean_cosine(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
    """Mean cosine over pairs (one row of a, one of b); ``same``: a is b, self-pairs left out."""
    pairs = (
        itertools.combinations(range(len(a)), 2)
        if same
        else itertools.product(range(len(a)), range(len(b)))
    )
    return float(torch.stack([F.cosine_similarity(a[i], b[j], dim=0) for i, j in pairs]).mean())


def spread(path: str, specs: list[str], n: int, swap_n: int = 0, batch: int = 50) -> dict:
    model, manifest, _ = load_artifact(path, device="cpu")
    embedding_rms = float(model.reasoner.get_input_embeddings().weight.float().pow(2).mean().sqrt())
    with torch.no_grad():
        latents = {spec: prompt_latents(model, manifest, spec, n) for spec in specs}
    swap = swap_accuracy(model, manifest, swap_n, batch, 96) if swap_n else None
    return {
        "artifact": path,
        "memory": {k: manifest["memory"].get(k) for k in ("inject", "kv_prefix", "lora_r")},
        "rms_over_embedding": {
            s: round(float(v.pow(2).mean().sqrt()) / embedding_rms, 2) for s, v in latents.items()
        },
        "cosine_within": {s: round(mean_cosine(v, v, True), 4) for s, v in latents.items()},
        "cosine_across": {
            f"{a} ~ {b}": round(mean_cosine(latents[a], latents[b], False), 4)
            for a, b in itertools.combinations(specs, 2)
        },
        "swap": swap,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", action="append", required=True, help="a weaver artifact")
    p.add_argument("--data", default="gym:basic_arithmetic,gym:letter_counting")
    p.add_argument("--n", type=int, default=8, help="held-out problems per task (at least 2)")
    p.add_argument("--swap-n", type=int, default=0, help="problems for the swapped-latents check")
    p.add_argument("--batch-size", type=int, default=50, help="rows per batch in that check")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be at least 2: a cosine needs two problems")
    specs = [s.strip() for s in args.data.split(",") if s.strip()]
    result = {
        "n": args.n,
        "artifacts": [
            spread(a, specs, args.n, args.swap_n, args.batch_size) for a in args.artifact
        ],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
