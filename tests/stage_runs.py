"""What the training stages' tests run and check: settings under which the loss must fall, a
finished run's checks (file set, no checkpoints, recipe round trip), the losses it logged, a
run through the command line, a run on the tiny recipes' TextWorld games, and a run over two
processes."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import Capture, files, rows, torchrun
from memgen_cli.config import load_recipe

# A few steps that must lower the loss: 4 samples, batch 4 (every step sees the same samples),
# 6 steps at a high learning rate.
OVERFIT = (
    "data.size=4",
    "training.batch_size=4",
    "training.max_steps=6",
    "training.learning_rate=0.01",
)


def finished_run(stage, cfg, artifact_files) -> tuple[Path, dict, Capture]:
    """``stage.run(cfg)`` with a ``Capture``, checked as every finished training run: exactly
    ``artifact_files`` written, no checkpoints left to resume, the recipe reading back as
    ``cfg``. Returns (the artifact, its manifest, the capture)."""
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    assert files(out) == artifact_files
    assert not stage.checkpoint_dir(cfg).exists()  # finished: nothing left to resume
    assert load_recipe(type(cfg), out / "recipe.yaml") == cfg
    return out, json.loads((out / "memgen.json").read_text()), capture


def command_run(cli, out: Path, artifact_files, *args) -> dict:
    """``cli(*args, "--output", out)`` (a training command's runner) succeeds and writes exactly
    ``artifact_files`` to ``out``; returns the artifact's manifest."""
    result = cli(*args, "--output", out)
    assert result.exit_code == 0, result.output
    assert files(out) == artifact_files
    return json.loads((out / "memgen.json").read_text())


def game_run_manifest(out: Path, stage: str, keep_latents: bool = True) -> dict:
    """The manifest of ``out``, an artifact that ``stage`` trained with a tiny TextWorld recipe
    (``recipes/tiny/textworld``), checked for what those recipes set: 2 coin_collector games
    (the prompts) in 2 steps, episodes of at most 3 turns, latents kept or not."""
    manifest = json.loads((out / "memgen.json").read_text())
    s = manifest["training"]
    assert (s["stage"], s["task"], s["prompts"], s["steps"]) == (
        stage, "textworld:coin_collector", 2, 2,
    )  # fmt: skip
    assert s["episodes"] == {"max_turns": 3, "keep_latents": keep_latents}
    return manifest


def losses(out: Path) -> list[float]:
    """The training losses a run logged in its artifact's ``metrics.jsonl``."""
    return [r["loss"] for r in rows(out / "metrics.jsonl") if "loss" in r]


def train_on_two_processes(command: str, recipe: Path, base, data: Path, cwd: Path) -> Path:
    """``memgen COMMAND`` with a tiny ``recipe`` on ``base`` and ``data`` over two processes
    (``torchrun``), output ``cwd/out``, which it returns once the run has succeeded."""
    out = cwd / "out"
    args = [command, "--recipe", recipe, "--base", base, "--data", data, "--output", out]
    proc = torchrun(args, cwd=cwd, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out
