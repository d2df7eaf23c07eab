"""`--output` never destroys what is not memgen's: a folder or file memgen did not write is
refused by every command before any model is loaded; memgen's own output is replaced only with
--overwrite (or a training stage's --resume), in one atomic swap that a Ctrl-C cannot split."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from helpers import invoke
from memgen_cli import atomic
from memgen_cli.artifacts import artifact_digest, read_manifest
from memgen_cli.errors import MemgenError
from memgen_cli.models import base as base_module
from memgen_cli.outputs import OUTPUT_MARKER, atomic_dir, check_output, write_output

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "tiny"
SFT = RECIPES / "sft-weaver.yaml"
GRPO = RECIPES / "grpo-weaver.yaml"
TRIGGER = RECIPES / "train-trigger.yaml"
ONE_STEP = ["--set", "training.max_steps=1"]
SHORT = ["--set", "training.max_completion_length=4"]
EVAL_FILES = ["memgen-output.json", "metrics.json", "predictions.jsonl"]

# tiny: conftest's (base_dir, weaver artifact, GSM8K-format file): read by tests, never written.
pytestmark = pytest.mark.usefixtures("one_thread")


def block_model_loads(monkeypatch) -> None:
    """A refusal must come before any model is loaded: loading one fails the test."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the --output check")

    monkeypatch.setattr(base_module.AutoModelForCausalLM, "from_pretrained", load)


@pytest.fixture
def no_model_loads(monkeypatch):
    block_model_loads(monkeypatch)


def memgen(*args):
    return invoke(*args, env={"COLUMNS": "400"})


def refused(result, *phrases) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in text
    for phrase in phrases:
        assert phrase in text, text
    return text


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old" in p.name)


def users_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("three weeks of notes\n")
    (path / "data").mkdir()
    (path / "data" / "results.csv").write_bytes(b"run,acc\n1,0.31\n")
    return snapshot(path)


def commands(tiny) -> dict[str, list]:
    """Every command that writes a folder, with the arguments it needs up to ``--output``."""
    base, art, data = tiny
    trained = ["--base", base, "--data", data]
    return {
        "sft-weaver": ["sft-weaver", "--recipe", SFT, *trained],
        "grpo-weaver": ["grpo-weaver", "--recipe", GRPO, *trained],
        "train-trigger": ["train-trigger", "--recipe", TRIGGER, "--artifact", art, *trained],
        "baseline sft": ["baseline", "sft", "--recipe", RECIPES / "baseline-sft.yaml", *trained],
        "baseline grpo": ["baseline", "grpo", "--recipe", RECIPES / "baseline-grpo.yaml", *trained],
        "eval": ["eval", "--artifact", art, "--data", data, "--limit", 2],
        "inspect-memory": ["inspect-memory", "--artifact", art, "--base", base, "--prompt", "2+3?"],
    }


TRAINING = ["sft-weaver", "grpo-weaver", "train-trigger", "baseline sft", "baseline grpo"]
NAMES = [*TRAINING, "eval", "inspect-memory"]


# ------------------------------------------------------------------- not memgen's: refused
@pytest.mark.parametrize("name", NAMES)
def test_a_folder_memgen_did_not_write_is_refused_before_any_model_loads(
    name, tiny, tmp_path, no_model_loads
):
    out = tmp_path / "runs"
    before = users_folder(out)
    args = commands(tiny)[name]
    resume = [["--resume", "auto"]] if name in TRAINING else []  # consent for artifacts only
    for extra in [[], ["--overwrite"], *resume]:
        result = memgen(*args, "--output", out, *extra)
        refused(
            result, f"--output {out}: the folder exists and is not a memgen", "notes.txt",
            "choose a new path or remove it yourself",
        )  # fmt: skip
        assert snapshot(out) == before  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no checkpoints, no temp


def test_a_file_where_a_folder_goes_is_refused(tiny, tmp_path, no_model_loads):
    path = tmp_path / "results"
    path.write_text("not a folder\n")
    for name in ("sft-weaver", "eval"):
        result = memgen(*commands(tiny)[name], "--output", path, "--overwrite")
        refused(result, f"--output {path} is a file, not a folder")
        assert path.read_text() == "not a folder\n"


def test_memgen_files_beside_a_users_file_are_refused_even_with_overwrite(tiny, tmp_path):
    _, art, _ = tiny
    out = tmp_path / "art"
    atomic_copy(art, out)
    (out / "README.md").write_text("my model card\n")
    before = snapshot(out)
    with pytest.raises(MemgenError, match=r"and also README\.md, which memgen did not write"):
        check_output(out, kind="artifact", overwrite=True)
    with pytest.raises(MemgenError, match="not a memgen eval output .it holds a memgen artifact"):
        check_output(out, kind="eval", overwrite=True)  # one command's output is not another's
    assert snapshot(out) == before


def atomic_copy(src: Path, dst: Path) -> None:
    with atomic_dir(dst) as tmp:
        for name, data in snapshot(src).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


def test_atomic_dir_refuses_a_folder_that_is_not_memgens_even_when_called_directly(tmp_path):
    out = tmp_path / "runs"
    before = users_folder(out)
    with pytest.raises(MemgenError, match="not a memgen artifact"):
        with atomic_dir(out) as tmp:
            (tmp / "memgen.json").write_text("{}")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    # ... and a folder that stops being memgen's while the block writes: refused at the swap.
    art = tmp_path / "art"
    with atomic_dir(art) as tmp:
        (tmp / "memgen.json").write_text('{"format_version": 1}')
    with pytest.raises(MemgenError, match="and also notes.txt"):
        with atomic_dir(art) as tmp:
            (art / "notes.txt").write_text("written meanwhile\n")
            (tmp / "memgen.json").write_text('{"format_version": 1, "new": true}')
    assert json.loads((art / "memgen.json").read_text()) == {"format_version": 1}
    assert (art / "notes.txt").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------- memgen's own: --overwrite
def test_sft_weaver_replaces_an_artifact_only_with_overwrite(tiny, tmp_path, monkeypatch):
    base, _, data = tiny
    out = tmp_path / "out"
    args = ["sft-weaver", "--recipe", SFT, "--base", base, "--data", data, *ONE_STEP]
    assert memgen(*args, "--output", out).exit_code == 0
    before = snapshot(out)
    with monkeypatch.context() as m:
        block_model_loads(m)
        result = memgen(*args, "--output", out)
    refused(result, f"--output {out} holds a memgen artifact; pass --overwrite to replace it")
    assert snapshot(out) == before
    result = memgen(*args, "--set", "training.seed=1", "--output", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["training"]["training_seed"] == 1
    assert snapshot(out)["weaver.safetensors"] != before["weaver.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp- / .old siblings
    # --resume consents to replacing an artifact only with a checkpoint to continue from: this
    # run ended, so there is none, and starting again needs --overwrite (test_resume.py too).
    before = snapshot(out)
    with monkeypatch.context() as m:
        block_model_loads(m)
        result = memgen(*args, "--set", "training.seed=2", "--output", out, "--resume", "auto")
    refused(result, "--resume auto: there is no checkpoint in", "pass --overwrite")
    assert snapshot(out) == before
    result = memgen(
        *args, "--set", "training.seed=2", "--output", out, "--resume", "auto", "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["training"]["training_seed"] == 2


def test_grpo_weaver_init_and_output_the_same_artifact(tiny, tmp_path):
    base, art, data = tiny
    x = tmp_path / "x"
    atomic_copy(art, x)
    old, digest = snapshot(x), artifact_digest(x)
    args = ["grpo-weaver", "--recipe", GRPO, "--base", base, "--data", data, *ONE_STEP, *SHORT]
    refused(memgen(*args, "--init", x, "--output", x), "holds a memgen artifact", "--overwrite")
    assert snapshot(x) == old
    result = memgen(*args, "--init", x, "--output", x, "--overwrite")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(x)  # read whole before the swap: the parent is the old one
    assert manifest["parent"] == {"name": str(x), "sha256": digest}
    assert manifest["training"]["stage"] == "grpo-weaver"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_train_trigger_replaces_its_own_input_only_with_overwrite(tiny, tmp_path):
    base, art, data = tiny
    x = tmp_path / "x"
    atomic_copy(art, x)
    old, digest = snapshot(x), artifact_digest(x)
    args = ["train-trigger", "--recipe", TRIGGER, "--base", base, "--data", data, *ONE_STEP]
    args += [*SHORT, "--artifact", x, "--output", x]
    refused(memgen(*args), f"--output {x} holds a memgen artifact; pass --overwrite")
    assert snapshot(x) == old
    result = memgen(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(x)
    assert manifest["kind"] == "memgen" and manifest["parent"]["sha256"] == digest
    assert snapshot(x)["weaver.safetensors"] == old["weaver.safetensors"]  # weaver frozen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_eval_output_is_replaced_only_with_overwrite(tiny, tmp_path):
    _, art, data = tiny
    out = tmp_path / "eval"
    out.mkdir()  # an empty folder is free to use
    args = ["eval", "--artifact", art, "--data", data, "--limit", 2, "--max-new-tokens", 4]
    assert memgen(*args, "--output", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == EVAL_FILES
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "eval" and marker["files"] == ["metrics.json", "predictions.jsonl"]
    before = snapshot(out)
    refused(memgen(*args, "--output", out), f"--output {out} holds a memgen eval output")
    assert snapshot(out) == before
    result = memgen(*args, "--memory", "off", "--output", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == EVAL_FILES
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["mode"] for r in rows] == ["off"]  # the new run's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    (out / "my-analysis.ipynb").write_text("{}")
    refused(
        memgen(*args, "--output", out, "--overwrite"),
        "and also my-analysis.ipynb, which memgen did not write",
    )
    assert (out / "my-analysis.ipynb").read_text() == "{}"


def test_inspect_memory_output_and_html_are_replaced_only_with_overwrite(tiny, tmp_path):
    base, art, _ = tiny
    out, html = tmp_path / "plots", tmp_path / "page.html"
    args = ["inspect-memory", "--artifact", art, "--base", base, "--prompt", "2+3?"]
    args += ["--max-new-tokens", 6, "--output", out, "--html", html]
    assert memgen(*args).exit_code == 0
    before, page = snapshot(out), html.read_bytes()
    assert json.loads(before[OUTPUT_MARKER])["kind"] == "inspect-memory"
    refused(memgen(*args), f"--output {out} holds a memgen inspect-memory output")
    assert snapshot(out) == before and html.read_bytes() == page
    assert memgen(*args, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "plots"]
    other = tmp_path / "other.html"
    other.write_text("<html><title>my page</title></html>")
    refused(
        memgen(*args[:-2], "--html", other, "--overwrite"),
        f"--html {other}: the file exists and is not a memgen inspect-memory page",
    )
    assert other.read_text() == "<html><title>my page</title></html>"


def test_generate_output_replaces_only_its_own_answers(tiny, tmp_path, monkeypatch):
    base, _, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 3?"}\n')
    args = ["generate", "--input", prompts, "--base", base, "--max-new-tokens", 4]
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"id": 1, "label": "keep me"}\n')
    with monkeypatch.context() as m:
        block_model_loads(m)
        for extra in ([], ["--overwrite"]):
            refused(
                memgen(*args, "--output", mine, *extra),
                f"--output {mine}: the file exists and is not a memgen generate answers file",
            )
        refused(memgen(*args, "--output", prompts, "--overwrite"), "is not a memgen generate")
    assert mine.read_text() == '{"id": 1, "label": "keep me"}\n'
    answers = tmp_path / "answers.jsonl"
    assert memgen(*args, "--output", answers).exit_code == 0
    first = answers.read_bytes()
    refused(memgen(*args, "--output", answers), "holds a memgen generate answers file")
    assert answers.read_bytes() == first
    assert memgen(*args, "--output", answers, "--overwrite").exit_code == 0
    assert json.loads(answers.read_text().splitlines()[0])["prompt"] == "What is 2 + 3?"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "mine.jsonl", "prompts.jsonl"]  # fmt: skip
    with pytest.raises(MemgenError, match="not a memgen generate answers file"):
        write_output(mine, "{}\n", kind="generate")  # the writer refuses too


# ------------------------------------------------------------------- the swap and Ctrl-C
def new_artifact(tmp: Path) -> None:
    (tmp / "memgen.json").write_text('{"format_version": 1, "new": true}\n')
    (tmp / "weaver.safetensors").write_bytes(b"new tensors")


def test_ctrl_c_at_the_exchange_leaves_the_old_artifact(tiny, tmp_path, monkeypatch):
    _, art, _ = tiny
    x = tmp_path / "x"
    atomic_copy(art, x)
    before = snapshot(x)

    def interrupted(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(x) as tmp:
            new_artifact(tmp)
    assert snapshot(x) == before and leftovers(tmp_path) == []


def test_ctrl_c_between_the_two_renames_puts_the_old_artifact_back(tiny, tmp_path, monkeypatch):
    """Where the filesystem cannot exchange: old aside, new in; a failure in between restores."""
    _, art, _ = tiny
    x = tmp_path / "x"
    atomic_copy(art, x)
    before = snapshot(x)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    calls, real = [], os.replace

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old one aside, the new one not yet in
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(x) as tmp:
            new_artifact(tmp)
    assert calls[0][0] == "x" and calls[2][1] == "x"  # aside, (interrupted), put back
    assert snapshot(x) == before and leftovers(tmp_path) == []


def test_a_real_ctrl_c_during_the_renames_waits_until_they_are_done(tiny, tmp_path, monkeypatch):
    _, art, _ = tiny
    x = tmp_path / "x"
    atomic_copy(art, x)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed:
    # the held signal must reach it once the renames are done.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst).name.endswith(".old"):  # the old one is aside: Ctrl-C now
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(x) as tmp:
                new_artifact(tmp)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads((x / "memgen.json").read_text())["new"]  # the swap finished first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_the_exchange_swaps_in_one_step_where_linux_can(tiny, tmp_path):
    if atomic._renameat2() is None:
        pytest.skip("no renameat2 here: the two-rename path is tested above")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "in-a").touch()
    assert atomic.exchange(a, b) and [p.name for p in b.iterdir()] == ["in-a"]
    _, art, _ = tiny
    x = tmp_path / "x"
    atomic_copy(art, x)
    with atomic_dir(x) as tmp:
        new_artifact(tmp)
    assert snapshot(x) == {"memgen.json": b'{"format_version": 1, "new": true}\n', "weaver.safetensors": b"new tensors"}  # fmt: skip
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- help
@pytest.mark.parametrize("name", [*NAMES, "generate"])
def test_every_writing_command_documents_overwrite(name):
    result = memgen(*name.split(), "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--overwrite" in text and "memgen wrote it" in text
