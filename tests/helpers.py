"""Shared test builders: tiny models saved as real model directories and tiny artifacts, tiny
recipe configs and their data, chat prompts, readers of what a stage writes, a weaver's
gradients, a CLI runner, a trainer callback, reward plug-ins, and torchrun. Fixtures built from
them are in conftest.py; what a training stage's tests run and check is in stage_runs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback
from typer.testing import CliRunner, Result

from conftest import make_memgen, make_model
from memgen_cli.artifacts import save_artifact
from memgen_cli.cli import app
from memgen_cli.models.base import LoadedBase, fingerprint, load_base

SHORT = "So {s}.\n#### {s}"  # write_problems' default answer: one line, then the final answer
WORKED = "Add {a}, then {b}.\nSo {s}.\n#### {s}"  # a two-step worked answer, for SFT

# The exact file sets that the training stages write (sft-weaver and grpo-weaver; the baselines).
WEAVER_ARTIFACT_FILES = frozenset(
    {
        "memgen.json",
        "recipe.yaml",
        "metrics.jsonl",
        "weaver.safetensors",
        "weaver/adapter_config.json",
        "weaver/adapter_model.safetensors",
    }
)
BASELINE_ARTIFACT_FILES = frozenset(
    {
        "memgen.json",
        "recipe.yaml",
        "metrics.jsonl",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
)


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


def checked_kv(mg, zero_b: bool = False):
    """``mg`` (a ``memory.inject: kv`` model), checked to have GQA (fewer KV heads than query
    heads); with ``zero_b``, its LoRA B matrices zeroed (the adapter then changes nothing)."""
    assert mg.reasoner.config.num_key_value_heads < mg.reasoner.config.num_attention_heads
    if zero_b:
        with torch.no_grad():
            for name, p in mg.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    return mg


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """``rows`` as a JSONL file at ``path`` (one JSON object a line)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_problems(path: Path, n: int, answer: str = SHORT) -> Path:
    """``n`` GSM8K-format problems "What is a + b?" (a = 0, 1, ..., b = a + 1) at ``path``;
    ``answer`` is formatted with ``a``, ``b`` and the sum ``s``."""
    rows = (
        {"question": f"What is {a} + {a + 1}?", "answer": answer.format(a=a, b=a + 1, s=2 * a + 1)}
        for a in range(n)
    )
    return write_jsonl(path, rows)


def tiny_config(stage, recipe: Path, base: Path, tmp: Path, sets, n: int, answer=SHORT, **flags):
    """``stage.resolve_config`` of a tiny recipe with ``sets`` on ``base``, training on ``n``
    problems written to ``tmp/train.jsonl`` (``write_problems``), output ``tmp/out``."""
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_problems(tmp / "train.jsonl", n, answer)
    return stage.resolve_config(
        recipe, list(sets), base=str(base), data=str(data), output=tmp / "out", **flags
    )


def chats(*texts: str) -> list[list[dict]]:
    """One single-turn chat (a user message) per text."""
    return [[{"role": "user", "content": text}] for text in texts]


def files(path: Path) -> set[str]:
    """Every file under ``path``, by its name relative to ``path``."""
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def tree(path: Path) -> dict[str, bytes | None]:
    """Every path under ``path`` with its bytes (None for a folder): what a run that fails must
    leave as it found it."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def rows(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def forward_and_grads(mg, forward, batch) -> tuple:
    """``forward(mg, *batch, return_logits=True)`` (``weave_forward`` or a reference) from
    zeroed gradients, and a copy of the gradient its loss gives each weaver tensor it reaches."""
    mg.zero_grad()
    out = forward(mg, *batch, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in mg.weaver_parameters().items() if p.grad is not None}
    return out, grads


def assert_training_equals_reference(mg, batch) -> None:
    """The fast training forward's loss and every weaver gradient equal the reference's (1e-4),
    and every layer's kv prefix learns, for both kinds of slot (the batch must have both)."""
    from memgen_cli.models.training import weave_forward
    from memgen_cli.models.training_reference import reference_weave_forward

    mg.set_trainable(weaver=True, trigger=False)
    fast, g_fast = forward_and_grads(mg, weave_forward, batch)
    ref, g_ref = forward_and_grads(mg, reference_weave_forward, batch)
    assert abs(fast.loss.item() - ref.loss.item()) < 1e-4
    # A tensor that one path's graph reaches and the other's does not (with memory.weaver_reads
    # cache, the fast path's one pass runs the slots' last layer, which no later token reads)
    # must get a zero gradient there.
    for name in g_fast.keys() ^ g_ref.keys():
        assert {**g_fast, **g_ref}[name].abs().max() == 0, name
    for name in g_fast.keys() & g_ref.keys():
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=1e-4, rtol=0, msg=name)
    for table in ("prefix_keys", "prefix_values"):
        for kind in ("prompt", "inference"):
            grad = g_ref[f"weaver.{table}.{kind}"]
            assert all(grad[layer].abs().max() > 0 for layer in range(grad.shape[0]))


def plain_names(state: dict) -> dict:
    """A PEFT model's base tensors under the plain model's names."""
    return {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in state.items()
        if "lora_" not in k
    }


def invoke(*args, **kwargs) -> Result:
    """``memgen ARGS`` in this process through Typer's CliRunner, every argument str()-ed."""
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


class Capture(TrainerCallback):
    """Keeps the model as training starts (``initial``: a copy of its state) and as it ends
    (``model``), and optionally sends Ctrl-C at the end of step ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None):
        self.interrupt_at, self.model, self.initial = interrupt_at, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


# Reward plug-ins for the GRPO tests: a test module imports them, and the stage loads them as
# <test module>:<name>. A test sets TARGET["tokens"] before it trains with first_token_reward.
TARGET = {"tokens": ()}


def first_token_reward(prompts, completions, completion_ids, **columns):
    """1 when the completion starts with one of the tokens the test chose."""
    return [float(bool(ids) and ids[0] in TARGET["tokens"]) for ids in completion_ids]


def broken_reward(prompts, completions, **columns):
    raise ValueError("no gold here")


# --output of a run whose reward raises at the first rollout (``broken_reward``): folders the run
# makes (two levels, as the default runs/tiny/<stage> can be), one that was there, an artifact
# that --overwrite would replace. Each must be left as it was.
BROKEN_REWARD_OUTPUTS = {
    "new-folders": "new/deeper/out",
    "existing-folder": "out",
    "over-an-artifact": "artifact",
}


def assert_broken_reward_leaves_folders(cli, recipe, tiny_weaver, tmp: Path, output, reward):
    """``cli`` (a stage's runner) with the reward plug-in ``reward`` (``broken_reward``)
    writing to ``output`` inside ``tmp`` (the working folder): one clear failure, and every
    path under ``tmp`` as it was (a copy of the weaver is there as ``artifact``)."""
    import shutil

    base_dir, weaver = tiny_weaver
    shutil.copytree(weaver, tmp / "artifact")
    data = write_problems(tmp / "train.jsonl", 8)
    before = tree(tmp)
    args = ["--reward", reward, "--overwrite"]
    result = cli("--recipe", recipe, "--base", base_dir, "--data", data, "--output", output, *args)
    assert result.exit_code == 2, result.output
    assert "reward function broken_reward raised ValueError" in " ".join(result.output.split())
    assert tree(tmp) == before


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
