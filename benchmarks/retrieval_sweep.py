"""Choose the retrieval baseline's k and similarity by measurement (issue 25).

Builds one retrieval artifact per (similarity, k) from a weaver recipe's training samples, then
scores all of them with memory off in one ``memgen eval`` on the same held-out problems, drawn
with a seed of their own (``--seed``, default 3,000,000: neither the training data nor the table's
held-out problems), beside the bare reasoner. Prints JSON: per artifact its accuracy (± s.e.),
answers per second, store and index build seconds, and the choice (highest accuracy; ties go to
the smaller k, then embed).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/retrieval_sweep.py \\
        --recipe recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml --output runs/retrieval

The chosen artifact is ``<output>/<similarity>-k<k>``; ``quality.py --table --retrieval DIR``
puts it in the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from memgen_cli.artifacts import read_manifest
from memgen_cli.config import GenerationConfig
from memgen_cli.stages import evaluate
from memgen_cli.stages import retrieval as stage

SWEEP_SEED = 3_000_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml")
    p.add_argument("--output", default="runs/retrieval")
    p.add_argument("--k", default="1,2,4", help="k values, comma-separated")
    p.add_argument("--similarity", default="embed,bm25", help="comma-separated")
    p.add_argument("--n", type=int, default=200, help="problems scored")
    p.add_argument("--seed", type=int, default=SWEEP_SEED, help="data seed of those problems")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--reuse", action="store_true", help="keep artifacts already built")
    return p.parse_args(argv)


def choose(results: list[dict]) -> dict:
    """Highest accuracy; ties to the smaller k, then embed.

    >>> choose([{"k": 2, "similarity": "bm25", "accuracy": .5},
    ...         {"k": 1, "similarity": "embed", "accuracy": .5}])["k"]
    1
    """
    return max(results, key=lambda r: (r["accuracy"], -r["k"], r["similarity"] == "embed"))


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output)
    quiet = Console(file=sys.stderr)
    built = []
    for similarity in [s.strip() for s in args.similarity.split(",") if s.strip()]:
        for k in [int(v) for v in args.k.split(",") if v.strip()]:
            path = out / f"{similarity}-k{k}"
            if not (args.reuse and (path / "memgen.json").is_file()):
                cfg = stage.resolve_config(args.recipe, [], k=k, similarity=similarity, output=path)
                stage.run(cfg, console=quiet, overwrite=True)
            built.append((similarity, k, path))
    weaver_cfg = stage.resolve_config(args.recipe, [])
    options = [f"{key}={json.dumps(v)}" for key, v in weaver_cfg.data.options.items()]
    metrics = evaluate.run(
        evaluate.EvalOptions(
            data=[weaver_cfg.data.task],
            base=weaver_cfg.model.base,
            artifact=[p for _, _, p in built],
            memory="off",
            limit=args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            gen=GenerationConfig(args.max_new_tokens, memory="off"),
            task_options=options,
            output=out / "sweep-eval",
            overwrite=True,
        ),
        console=quiet,
    )
    results = []
    for similarity, k, path in built:
        row = next(r for r in metrics["results"] if r["artifact"] == str(path))
        training = read_manifest(path)["training"]
        results.append(
            {
                "similarity": similarity,
                "k": k,
                "artifact": str(path),
                "accuracy": row["accuracy"],
                "stderr": row["stderr"],
                "samples_per_s": row["samples_per_s"],
                "store_s": training.get("store_s"),
                "index_s": training.get("index_s"),
            }
        )
    report = {
        "task": weaver_cfg.data.task,
        "n": args.n,
        "seed": args.seed,
        "results": results,
        "chosen": choose(results),
        "eval_seconds": metrics.get("seconds"),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
