"""The agents table (issue 24): weaver-SFT against memory off and LoRA-SFT at equal budget, on
held-out text games, in one command.

One recipe (a ``textworld:`` sft-weaver recipe, which also drives ``baseline sft``) trains the
weaver and the LoRA baseline; one ``memgen eval`` then plays the same held-out games with the
reasoner alone (memory off), the weaver (memory woven at every turn start) and the LoRA-adapted
reasoner. Prints one JSON object: per row its success rate ± s.e., mean steps, invalid-action
rate, weaves per episode and episodes per second; the weaver and LoRA rows against memory off
and the weaver against LoRA, paired on the same games (difference ± s.e., McNemar p); each
training's wall seconds and trainable parameters (from its memgen.json).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality_games.py \\
        --recipe recipes/smollm2-135m/textworld/coin_collector/sft-weaver.yaml \\
        --output runs/games --n 96

``--reuse`` keeps artifacts already trained under ``--output`` (a training run is
deterministic, so a rerun of the eval alone gives the same table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from memgen_cli.evaluation.stats import paired


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipe", default="recipes/smollm2-135m/textworld/coin_collector/sft-weaver.yaml"
    )
    p.add_argument("--output", default="runs/games")
    p.add_argument("--n", type=int, default=96, help="held-out games played per row")
    p.add_argument("--batch-size", type=int, default=32, help="games played together")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--reuse", action="store_true", help="keep artifacts already trained")
    return p.parse_args(argv)


def memgen(*args: str) -> None:
    """One memgen command, its log lines passed through; a failure stops the table."""
    cmd = [sys.executable, "-m", "memgen_cli", *args]
    print("$ memgen " + " ".join(args), file=sys.stderr, flush=True)
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise SystemExit(f"failed: memgen {' '.join(args)}")


def train(stage: list[str], recipe: str, out: Path, reuse: bool) -> dict:
    """Train (unless reused) and return the artifact's manifest."""
    if not (reuse and (out / "memgen.json").exists()):
        memgen(*stage, "--recipe", recipe, "--output", str(out), "--overwrite")
    return json.loads((out / "memgen.json").read_text())


def row_key(p: dict) -> str:
    """``weaver:off``, ``weaver:weaver`` or ``lora-sft``: a record's or a metrics row's row.

    >>> row_key({"artifact": "runs/games/baseline-sft", "mode": "off"})
    'lora-sft'
    >>> row_key({"artifact": "runs/games/sft-weaver", "mode": "weaver"})
    'weaver:weaver'
    """
    return (
        "lora-sft" if (p.get("artifact") or "").endswith("baseline-sft") else f"weaver:{p['mode']}"
    )


def found(tree, key: str):
    """The first value of ``key`` anywhere in a manifest (where a stage records it varies).

    >>> found({"training": {"budget": {"trainable_params": 7}}}, "trainable_params")
    7
    """
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            if (hit := found(value, key)) is not None:
                return hit
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output)
    weaver = train(["sft-weaver"], args.recipe, out / "sft-weaver", args.reuse)
    lora = train(["baseline", "sft"], args.recipe, out / "baseline-sft", args.reuse)
    task = weaver["training"]["task"]
    memgen(
        "eval", "--artifact", str(out / "sft-weaver"), "--artifact", str(out / "baseline-sft"),
        "--memory", "off,weaver", "--data", task, "--limit", str(args.n),
        "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
        "--output", str(out / "eval"), "--overwrite",
    )  # fmt: skip
    print(json.dumps(table(out / "eval", task, weaver, lora), indent=1))


def table(evaluated: Path, task: str, weaver: dict, lora: dict) -> dict:
    """The figures of one eval (``evaluated``: its metrics.json and predictions.jsonl) of the
    weaver (memory off and woven) and the LoRA baseline; ``weaver``/``lora``: their manifests."""
    metrics = json.loads((evaluated / "metrics.json").read_text())
    won: dict[str, dict[int, bool]] = {}
    for line in (evaluated / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        won.setdefault(row_key(p), {})[p["index"]] = bool(p["correct"])
    games = sorted(won["weaver:off"])
    vector = {k: [v[i] for i in games] for k, v in won.items()}
    keep = ("accuracy", "stderr", "n", "mean_steps", "invalid_action_rate", "weaves_per_episode",
            "samples_per_s")  # fmt: skip
    rows = {row_key(r): {k: r[k] for k in keep} for r in metrics["results"]}
    pairs = {
        "weaver_vs_off": paired(vector["weaver:off"], vector["weaver:weaver"]),
        "lora_vs_off": paired(vector["weaver:off"], vector["lora-sft"]),
        "weaver_vs_lora": paired(vector["lora-sft"], vector["weaver:weaver"]),
    }
    training = {
        name: {key: found(m, key) for key in ("wall_s", "steps", "trainable_params")}
        for name, m in (("weaver", weaver), ("lora", lora))
    }
    games_of = metrics["config"]["tasks"][task]
    return {"task": task, "options": games_of["options"], "seed": games_of["seed"],
            "rows": rows, "paired": pairs, "training": training}  # fmt: skip


if __name__ == "__main__":
    main()
