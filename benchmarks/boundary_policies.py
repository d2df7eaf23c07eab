"""Which boundary latents carry a weaver's gain? Accuracy under fixed INVOKE/SKIP policies.

A trained trigger can only save insertions where skipping costs nothing. This scores one weaver
artifact on its own task (held-out problems, as ``memgen eval`` builds them; greedy) with latents
at the prompt and, at the clause boundaries below the cap, by a fixed rule instead of a trigger:

- ``all``: every boundary (memory ``weaver``);   ``none``: no boundary (prompt latents only);
- ``first``: the first boundary only;             ``notfirst``: every boundary but the first.

For each policy: accuracy, inference insertions per answer, seconds; then, per number of
boundaries the ``all`` answers had, the accuracy of each policy. Prints one JSON object.

    .venv/bin/python benchmarks/boundary_policies.py --artifact runs/quality/weaver --limit 200

Measured on the arithmetic weaver (``recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml``,
n 200): all 35.0 %, first 25.5 %, notfirst 25.0 %, none 23.5 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import task_prompts  # noqa: E402

from memgen_cli.cli import quiet_libraries  # noqa: E402
from memgen_cli.config import GenerationConfig  # noqa: E402
from memgen_cli.data import get_task  # noqa: E402
from memgen_cli.generation import encode_prompts, generate  # noqa: E402
from memgen_cli.stages import evaluate  # noqa: E402
from memgen_cli.stages.common import open_session  # noqa: E402

POLICIES = ("all", "none", "first", "notfirst")


class FixedPolicy:
    """``decide`` hook for ``generate``: INVOKE by the boundary's index within its row."""

    def __init__(self, policy: str):
        self.policy, self.seen = policy, {}

    def __call__(self, hidden, eligible, token, emitted) -> torch.Tensor:
        invoke = torch.zeros_like(eligible)
        for r in eligible.nonzero().flatten().tolist():
            k = self.seen.get(r, 0)
            self.seen[r] = k + 1
            invoke[r] = {"all": True, "none": False, "first": k == 0, "notfirst": k > 0}[
                self.policy
            ]
        return invoke


def score(model, task, examples, messages, policy, tokens, batch) -> dict:
    correct, inserted, boundaries, start = [], [], [], time.perf_counter()
    for i in range(0, len(messages), batch):
        enc = encode_prompts(model.tokenizer, messages[i : i + batch], model.device)
        hook = FixedPolicy(policy)
        out = generate(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            GenerationConfig(tokens, memory="weaver"),
            decide=hook,
        )
        for r, ids in enumerate(out.tokens):
            text = model.tokenizer.decode(ids, skip_special_tokens=True)
            correct.append(float(task.grade(text, examples[i + r])))
            inserted.append(sum(x.kind == "inference" for x in out.trace.for_row(r)))
            boundaries.append(hook.seen.get(r, 0))
    n = len(correct)
    return {
        "accuracy": round(100 * sum(correct) / n, 2),
        "inference_insertions_per_answer": round(sum(inserted) / n, 3),
        "seconds": round(time.perf_counter() - start, 1),
        "correct": correct,
        "boundaries": boundaries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="a weaver artifact")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=50)
    a = ap.parse_args()
    policies = a.policies.split(",")
    if unknown := set(policies) - set(POLICIES):
        ap.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    quiet_libraries()
    notes = Console(stderr=True)
    session = open_session(None, a.artifact, device="cpu")
    spec, messages = task_prompts(session, None, a.limit, notes)
    task = get_task(spec, **evaluate.task_options(spec, {}, [session.manifest], notes))
    seed = evaluate.data_seed(task, None, a.limit, session.manifest, notes)
    examples = task.load(None, a.limit, seed)
    runs = {}
    for policy in policies:
        runs[policy] = score(
            session.model, task, examples, messages, policy, a.max_new_tokens, a.batch_size
        )
        notes.print(f"{policy}: {runs[policy]['accuracy']} %")
    # Group by the boundaries each problem reached under the first policy run (all, by default).
    first = runs[policies[0]]["boundaries"]
    by_boundaries = {}
    for k in sorted(set(first)):
        idx = [i for i, b in enumerate(first) if b == k]
        by_boundaries[str(k)] = {"n": len(idx)} | {
            p: round(100 * sum(runs[p]["correct"][i] for i in idx) / len(idx), 1) for p in runs
        }
    result = {
        "artifact": a.artifact,
        "task": spec,
        "n": len(messages),
        "policies": {
            p: {k: v for k, v in r.items() if k not in ("correct", "boundaries")}
            for p, r in runs.items()
        },
        f"accuracy_by_boundaries_under_{policies[0]}": by_boundaries,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
