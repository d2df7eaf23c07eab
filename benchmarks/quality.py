"""Does the memory help? One recipe end to end, against memory off and a LoRA reference.

Trains the weaver with a ``sft-weaver`` recipe, trains the plain LoRA-SFT reference of the
reasoner (``memgen baseline sft``) on the same samples, steps, batches and learning-rate
schedule, then evaluates memory ``off``, the ``weaver`` and the LoRA reference on exactly the
same held-out problems of the training task and of one task never trained on (cross-domain,
paper Fig. 9). Prints one JSON object: task and settings, training seconds, held-out loss
(memory off / untrained weaver / trained weaver / LoRA), accuracy ± standard error per row,
the paired difference of each row against memory off, mean insertions per answer.

    .venv/bin/python benchmarks/quality.py                          # n = 400 (+ 200 cross-domain)
    .venv/bin/python benchmarks/quality.py --n 100 --no-lora --set training.max_steps=60
    .venv/bin/python benchmarks/quality.py --reuse runs/quality     # re-evaluate trained models

Run it alone on the machine: training and evaluation times are part of what it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from memgen_cli.artifacts import read_manifest
from memgen_cli.config import BaselineConfig, GenerationConfig, SFTConfig, load_recipe
from memgen_cli.stages import baseline, evaluate, sft_weaver

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml"
# Never trained on: chain_sum states a problem differently ("State the final answer to the
# following arithmetic problem: 4 + 3 =") and mixes in 1-2 digit terms the same way.
CROSS = "gym:chain_sum"
CROSS_OPTIONS = [
    "config={min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2, allow_negation: false}"
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(RECIPE), help="a sft-weaver recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=value")
    p.add_argument("--n", type=int, default=400, help="held-out problems of the training task")
    p.add_argument("--cross-n", type=int, default=200, help="held-out problems of --cross")
    p.add_argument("--cross", default=CROSS, help="a task never trained on ('' to skip)")
    p.add_argument("--cross-option", action="append", default=None, help="its --task-option")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA-SFT reference")
    p.add_argument("--output", default="runs/quality", help="folder for models and evals")
    p.add_argument("--reuse", action="store_true", help="keep models already in --output")
    return p.parse_args(argv)


def train(cfg: SFTConfig, out: Path, lora: bool, reuse: bool, quiet: Console) -> dict[str, Path]:
    """The weaver and (optionally) its LoRA reference, trained on the same samples and steps."""
    paths = {"weaver": out / "weaver"}
    if not (reuse and (paths["weaver"] / "memgen.json").is_file()):
        sft_weaver.run(dataclasses.replace(cfg, output=str(paths["weaver"])), console=quiet)
    if lora:
        paths["lora"] = out / "lora"
        if not (reuse and (paths["lora"] / "memgen.json").is_file()):
            ref = BaselineConfig(
                model=cfg.model,
                weaver=cfg.memory,
                data=cfg.data,
                training=cfg.training,
                output=str(paths["lora"]),
            )
            baseline.run(ref, console=quiet)
    return paths


def evaluate_task(
    paths: dict[str, Path], task: str, options: list[str], n: int, args, out: Path, quiet: Console
) -> dict:
    """Every model on the same problems of ``task``: off, weaver, LoRA (when trained)."""
    opts = evaluate.EvalOptions(
        data=[task],
        artifact=list(paths.values()),
        memory="off,weaver",
        limit=n,
        batch_size=args.batch_size,
        gen=GenerationConfig(args.max_new_tokens, memory="off"),
        task_options=options,
        output=out / f"eval-{task.replace(':', '-')}",
        json=True,
    )
    metrics = evaluate.run(opts, console=quiet)
    rows = {}
    for r in metrics["results"]:
        name = "lora" if r["artifact"] == str(paths.get("lora")) else r["mode"]
        rows[name] = {
            "accuracy": round(100 * r["accuracy"], 2),
            "stderr": round(100 * r["stderr"], 2),
            "n": r["n"],
            "insertions_per_answer": round(r["mean_insertions"], 2),
            "tokens_per_answer": round(r["mean_tokens"], 1),
            "samples_per_s": r["samples_per_s"] and round(r["samples_per_s"], 2),
            "vs_off": r.get("vs_first"),
        }
    return {"task": task, "task_options": options, "seconds": metrics["seconds"], "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    cfg = load_recipe(SFTConfig, args.recipe, args.overrides)
    out = Path(args.output)
    quiet = Console(file=sys.stderr)
    paths = train(cfg, out, not args.no_lora, args.reuse, quiet)
    weaver = read_manifest(paths["weaver"])["training"]
    own = [f"{k}={json.dumps(v)}" for k, v in cfg.data.options.items()]
    tasks = [evaluate_task(paths, cfg.data.task, own, args.n, args, out, quiet)]
    if args.cross:
        cross_opts = CROSS_OPTIONS if args.cross_option is None else args.cross_option
        tasks.append(evaluate_task(paths, args.cross, cross_opts, args.cross_n, args, out, quiet))
    result = {
        "recipe": str(args.recipe),
        "overrides": args.overrides,
        "task": cfg.data.task,
        "task_options": cfg.data.options,
        "memory": dataclasses.asdict(cfg.memory),
        "training": {
            k: getattr(cfg.training, k)
            for k in ("learning_rate", "max_steps", "batch_size", "scheduler", "schedule")
        },
        "samples": weaver["samples"],
        "train_s": {"weaver": weaver["wall_s"]},
        "heldout_loss": {
            "off": weaver["heldout_loss"].get("memory_off"),
            "weaver_untrained": weaver["heldout_loss"].get("weaver_initial"),
            "weaver": weaver["heldout_loss"].get("weaver_final"),
        },
        "eval": tasks,
        "omp_num_threads": torch_threads,
    }
    if "lora" in paths:
        manifest = read_manifest(paths["lora"])
        lora = manifest["training"]
        result["train_s"]["lora"] = lora.get("wall_s")
        result["heldout_loss"]["lora"] = (lora.get("heldout_loss") or {}).get("lora_final")
        result["lora_rank"] = manifest["lora"].get("r")
        result["trainable_params"] = {
            "weaver": manifest["budget"]["weaver_trainable_params"],
            "lora": manifest["budget"]["trainable_params"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
