"""Shared test builders: tiny models saved as real model directories and tiny artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_memgen, make_model
from memgen_cli.artifacts import save_artifact
from memgen_cli.models.base import LoadedBase, fingerprint, load_base


def save_tiny_base(path: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A tiny model + tokenizer written with save_pretrained: usable as ``--base path``."""
    model, tok = make_model(kind, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_artifact(
    tmp: Path, kind: str = "llama", trained_trigger: bool = False, **memory
) -> tuple[Path, Path]:
    """(base_dir, artifact_dir): a tiny base on disk and a weaver artifact trained on it."""
    base_dir = save_tiny_base(tmp / f"base-{kind}", kind)
    base = load_base(str(base_dir), device="cpu")
    mg = make_memgen(kind, **memory)
    mg.reasoner.load_state_dict(base.model.state_dict(), strict=False)
    with torch.no_grad():
        for p in mg.weaver.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        if trained_trigger:
            mg.trigger.trained.fill_(True)
    loaded = LoadedBase(mg.reasoner, base.tokenizer, str(base_dir), str(base_dir), base.fingerprint)
    art = save_artifact(
        mg,
        loaded,
        tmp / f"artifact-{kind}",
        prompt={"prompt_suffix": "Answer briefly."},
        recipe_yaml="memory: {}\n",
        training={"task": "test"},
    )
    assert base.fingerprint == fingerprint(mg.reasoner.config, base.tokenizer)
    return base_dir, art


def torchrun(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m memgen_cli ARGS``, one thread per worker.

    Runs in its own process group, stopped if it outlives ``timeout`` (the launcher is asked to
    stop its workers first, then killed).
    """
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "memgen_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            # torchrun starts its workers in sessions of their own, out of reach of killpg:
            # SIGTERM lets the launcher stop them first; SIGKILL if it does not within 20 s.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
