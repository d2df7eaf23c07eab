"""Every command that README.md and docs/**/*.md show still parses, without running any of them.

Commands come from ``benchmarks/doc_commands.py`` (which lines are commands, placeholders,
classes). For each one:

- ``memgen``: the (sub)command exists and Click's own parser takes every option with a value of
  its type (``make_context``: parsing only, the command's function never runs); each path under
  ``recipes/`` exists; a training stage's recipe and ``--set`` keys resolve into its config
  (``stage.resolve_config``, the CLI's own path: unknown keys are errors); ``--task-option``
  values parse.
- ``python benchmarks/x.py``: the script exists and its own argparse parser (taken from its
  ``main`` as it starts to parse) accepts the flags and their values.
- ``make``: every target is in the Makefile.

A prose mention (`memgen eval`) and a ``--help`` line need not give a command's required options.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import typer

try:  # typer >= 0.2x parses with its own copy of Click; before, with click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    import click.exceptions as click_errors

from memgen_cli.cli import app
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.plan import parse_task_options
from memgen_cli.stages import (
    baseline,
    baseline_grpo,
    evaluate,
    grpo_weaver,
    retrieval,
    sft_weaver,
    train_trigger,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CLI = typer.main.get_command(app)
# The stage that resolves each training command's recipe and --set (as o.train does).
STAGES = {
    "sft-weaver": sft_weaver,
    "grpo-weaver": grpo_weaver,
    "train-trigger": train_trigger,
    "baseline sft": baseline,
    "baseline grpo": baseline_grpo,
    "baseline retrieval": retrieval,
}
RECIPE_PATH = re.compile(r"(?<![\w/.-])recipes/[\w./-]+")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", re.MULTILINE)
HELP = ("--help", "-h")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # as `python benchmarks/x.py` has it: siblings import
    spec.loader.exec_module(module)
    return module


DOC = load(BENCH / "doc_commands.py", "doc_commands")
COMMANDS = DOC.extract()
CHECKED = [c for c in COMMANDS if c.placeholder is None]


# ----------------------------------------------------------------------------- the checker
def problems(cmd) -> list[str]:
    """What is wrong with one doc command; empty when it would parse as written."""
    named = [path for arg in cmd.args for path in RECIPE_PATH.findall(arg)]
    found = [f"{path} does not exist" for path in named if not (ROOT / path).exists()]
    check = {"memgen": memgen_problems, "python": python_problems, "make": make_problems}
    return found + check[cmd.program](cmd)


def memgen_problems(cmd) -> list[str]:
    args = [a for a in cmd.args if a not in HELP]
    partial = cmd.inline or len(args) < len(cmd.args)  # prose, or --help: options may be few
    command, path = CLI, []
    while hasattr(command, "list_commands") and args and not args[0].startswith("-"):
        ctx = typer.Context(command)
        sub = command.get_command(ctx, args[0])
        if sub is None:
            known = ", ".join(command.list_commands(ctx))
            return [f'no command "{" ".join(["memgen", *path, args[0]])}" (there are: {known})']
        command, path, args = sub, [*path, args[0]], args[1:]
    if hasattr(command, "list_commands"):  # a group given no subcommand
        return [] if partial else [f'"memgen {" ".join(path)}" needs a subcommand']
    try:  # parses and converts only: a Command's function runs in invoke(), never here
        ctx = command.make_context(" ".join(["memgen", *path]), args, resilient_parsing=False)
    except click_errors.MissingParameter as exc:
        return [] if partial else [exc.format_message()]
    except click_errors.UsageError as exc:
        return [exc.format_message()]
    return config_problems(" ".join(path), command, ctx.params)


def config_problems(path: str, command, params: dict) -> list[str]:
    found = []
    if any("--set" in p.opts for p in command.params):
        if path not in STAGES:
            return [
                f'"memgen {path}" takes --set: add its stage to STAGES in {Path(__file__).name}'
            ]
        recipe = params.get("recipe")
        try:
            STAGES[path].resolve_config(ROOT / recipe if recipe else None, params.get("set_"))
        except MemgenError as exc:
            found.append(str(exc))
    try:
        parse_task_options(params.get("task_option") or [])
    except MemgenError as exc:
        found.append(str(exc))
    return found


class _Parsed(Exception):
    """Raised in place of argparse's parsing (carrying the parser a script built) or of its
    exit on an error (carrying the message)."""


@functools.cache
def bench_module(script: Path):
    return load(script, f"doc_bench_{script.stem}")


@functools.cache
def bench_parser(script: Path) -> argparse.ArgumentParser:
    """The parser ``script``'s ``main()`` builds, caught as it starts to parse (nothing runs)."""
    module = bench_module(script)

    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", caught):
        try:
            module.main()
        except _Parsed as got:
            return got.args[0]
    raise AssertionError(f"{script.name}: main() returned without parsing arguments")


def python_problems(cmd) -> list[str]:
    script = ROOT / cmd.args[0]
    if not script.is_file():
        return [f"no script {cmd.args[0]}"]
    if script.parent != BENCH:
        return []
    flags = [a for a in cmd.args[1:] if a not in HELP]
    # A script's own parse_args(argv) also runs its checks across flags; else parse alone.
    module = bench_module(script)
    parse = module.parse_args if hasattr(module, "parse_args") else bench_parser(script).parse_args

    def error(parser, message):
        raise _Parsed(message)

    with mock.patch.object(argparse.ArgumentParser, "error", error):
        try:
            parse(flags)
        except _Parsed as exc:
            return [f"{script.name}: {exc.args[0]}"]
    return []


def make_problems(cmd) -> list[str]:
    targets = set(MAKE_TARGET.findall((ROOT / "Makefile").read_text())) - {".PHONY"}
    asked = [a for a in cmd.args if not a.startswith("-") and "=" not in a]
    return [f'no make target "{t}" in the Makefile' for t in asked if t not in targets]


# ----------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("cmd", CHECKED, ids=[f"{c.where} {c.program} {c.path}" for c in CHECKED])
def test_doc_command_parses(cmd):
    found = problems(cmd)
    assert not found, f"{cmd.where}: `{cmd.text}`:\n  " + "\n  ".join(found)


def test_every_doc_with_code_blocks_gives_commands():
    files = {c.file for c in COMMANDS if not c.inline}
    assert {"README.md", "docs/results.md", "docs/development.md"} <= files
    assert {f"docs/stages/{s}.md" for s in ("sft-weaver", "eval", "generate", "baseline")} <= files
    assert len([c for c in COMMANDS if not c.inline]) > 80


def test_every_command_has_a_class():
    classes = {DOC.classify(c) for c in COMMANDS}
    assert classes <= {"gpu", "tiny", "train", "slow", "setup", "fast", "mention", "placeholder"}
    by_where = {(c.where, c.path): DOC.classify(c) for c in COMMANDS}
    assert by_where["docs/stages/sft-weaver.md:17", "sft-weaver"] == "gpu"  # Qwen2.5-1.5B
    assert by_where["docs/stages/sft-weaver.md:18", "sft-weaver"] == "tiny"  # recipes/tiny/
    assert by_where["docs/stages/sft-weaver.md:16", "sft-weaver"] == "train"
    assert by_where["docs/stages/train-trigger.md:12", "train-trigger"] == "tiny"
    assert by_where["docs/stages/generate.md:10", "generate"] == "fast"


# ----------------------------------------------------------------------------- the checker, tested
MARKDOWN = """\
Run `memgen eval` or `memgen COMMAND --help`; the cache is `~/.cache/memgen`, and `memgen
generate "Hi" --json` answers.

```bash
OMP_NUM_THREADS=2 .venv/bin/memgen eval --data gym:basic_arithmetic \\
    --limit 20 --max-new-tokens 8   # a comment, with --bogus in it
$ memgen generate "What is 2 # 3?" --json > out.json
memgen eval --artifact <dir> --data gym:basic_arithmetic
torchrun --nproc_per_node 2 -m memgen_cli sft-weaver --recipe recipes/tiny/sft-weaver.yaml
accuracy 35.0 %   (output, not a command)
make lint && make test-fast
```
"""


def test_extraction_joins_lines_and_drops_comments_output_and_redirects():
    found = DOC.commands_in(MARKDOWN, "x.md")
    rows = [(c.line, c.program, c.args, c.inline, c.placeholder) for c in found]
    assert rows == [
        (1, "memgen", ["eval"], True, None),
        (1, "memgen", ["COMMAND", "--help"], True, "COMMAND"),
        (1, "memgen", ["generate", "Hi", "--json"], True, None),
        (5, "memgen", ["eval", "--data", "gym:basic_arithmetic", "--limit", "20"]
         + ["--max-new-tokens", "8"], False, None),
        (7, "memgen", ["generate", "What is 2 # 3?", "--json"], False, None),
        (8, "memgen", ["eval", "--artifact", "<dir>", "--data", "gym:basic_arithmetic"],
         False, "<dir>"),
        (9, "memgen", ["sft-weaver", "--recipe", "recipes/tiny/sft-weaver.yaml"], False, None),
        (11, "make", ["lint"], False, None),
        (11, "make", ["test-fast"], False, None),
    ]  # fmt: skip
    assert found[3].env == {"OMP_NUM_THREADS": "2"}
    assert found[3].comment == "a comment, with --bogus in it"
    assert found[6].prefix == ["torchrun", "--nproc_per_node", "2", "-m", "memgen_cli"]
    assert [DOC.classify(c) for c in found] == [
        "mention", "placeholder", "fast", "fast", "fast", "placeholder", "tiny", "fast", "slow"
    ]  # fmt: skip
    assert not [problems(c) for c in found if not c.placeholder if problems(c)]


def test_listing_and_launch():
    report = DOC.listing(DOC.commands_in(MARKDOWN, "x.md"))
    assert report["counts"] == {"mention": 1, "placeholder": 2, "fast": 4, "tiny": 1, "slow": 1}
    assert report["commands"][3]["where"] == "x.md:5"
    assert report["commands"][5]["needs"] == ["<dir>"]
    found = DOC.commands_in(MARKDOWN, "x.md")
    torchrun, make = found[6], found[7]
    assert DOC.launch(torchrun)[0].endswith("torchrun")
    assert DOC.launch(torchrun)[1:] == torchrun.prefix[1:] + torchrun.args
    assert DOC.launch(found[3])[1:4] == ["-m", "memgen_cli", "eval"]
    assert DOC.launch(make) == ["make", "lint"]


def test_run_links_in_the_inputs_it_has(tmp_path):
    runs, scratch = tmp_path / "runs", tmp_path / "scratch"
    (runs / "demo" / "sft-weaver").mkdir(parents=True)
    scratch.mkdir()
    assert DOC.link_input("runs/demo/sft-weaver", scratch, runs)
    assert (scratch / "runs/demo/sft-weaver").is_symlink()
    assert not (scratch / "runs/demo").is_symlink()  # what a command writes beside stays here
    assert not DOC.link_input("runs/demo/lora", scratch, runs)
    assert not DOC.link_input("prompts.jsonl", scratch, None)


TINY_RUNS = """\
```bash
memgen sft-weaver --recipe recipes/tiny/sft-weaver.yaml --output runs/tiny
memgen train-trigger --recipe recipes/tiny/train-trigger.yaml --artifact runs/tiny --output runs/t
memgen train-trigger --recipe recipes/tiny/train-trigger.yaml --artifact runs/other
memgen grpo-weaver --recipe recipes/tiny/grpo-weaver.yaml --reward my_rewards:brevity
memgen grpo-weaver --recipe recipes/tiny/grpo-weaver.yaml --reward memgen_cli.data.graders:x
memgen sft-weaver --recipe recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml
```
"""
# Stands in for memgen: makes its --output folder, says on stderr what it was given.
FAKE_MEMGEN = """\
import json, os, sys
a = sys.argv[1:]
if "--output" in a:
    os.makedirs(a[a.index("--output") + 1])
base = a[a.index("--base") + 1]
print(json.dumps([a[0], os.path.isfile(os.path.join(base, "config.json"))]), file=sys.stderr)
"""


def test_run_tiny_in_order_in_one_folder_on_a_tiny_base(monkeypatch):
    found = DOC.commands_in(TINY_RUNS, "x.md")
    assert [DOC.classify(c) for c in found] == ["tiny"] * 5 + ["train"]
    assert [DOC.needs(c) for c in found[2:5]] == [["runs/other"], ["my_rewards.py"], []]
    monkeypatch.setattr(DOC, "launch", lambda cmd: [sys.executable, "-c", FAKE_MEMGEN, *cmd.args])
    results = DOC.run_class(found, "tiny", None, timeout=60, base="tiny_base")
    assert [r["where"] for r in results] == [f"x.md:{n}" for n in (2, 3, 4, 5, 6)]
    assert [r["rc"] for r in results] == [0, 0, None, None, 0]  # the 2nd finds what the 1st made
    assert [r.get("skipped") for r in results[2:4]] == ["needs runs/other", "needs my_rewards.py"]
    assert json.loads(results[1]["stderr_tail"]) == ["train-trigger", True]  # the 2-layer base
    assert Path(results[0]["base"]).name == "tiny-base"


def test_run_only_what_matches_in_a_kept_folder_that_a_later_run_reads(monkeypatch, tmp_path):
    found = DOC.commands_in(TINY_RUNS, "x.md")
    monkeypatch.setattr(DOC, "launch", lambda cmd: [sys.executable, "-c", FAKE_MEMGEN, *cmd.args])
    keep = tmp_path / "kept"
    first = DOC.run_class(found, "tiny", None, 60, "tiny_base", only="x.md:2$", keep=keep)
    assert [(r["where"], r["rc"]) for r in first] == [("x.md:2", 0)]
    assert (keep / "runs/tiny").is_dir() and (keep / "recipes").is_symlink()
    second = DOC.run_class(found, "tiny", None, 60, "tiny_base", only="--output runs/t$", keep=keep)
    assert [(r["where"], r["rc"]) for r in second] == [("x.md:3", 0)]  # finds the first's output
    assert (keep / "runs/t").is_dir()


@pytest.mark.parametrize(
    "line, expected",
    [
        ("memgen eval --data gym:chain_sum --limt 5", "No such option: --limt"),
        ("memgen evaluate --data gym:chain_sum", 'no command "memgen evaluate"'),
        ("memgen baseline sfft", 'no command "memgen baseline sfft"'),
        ("memgen eval --data gym:chain_sum --limit many", "Invalid value for '--limit'"),
        ("memgen eval --limit 5", "Missing option '--data'"),
        ("memgen sft-weaver --recipe recipes/tiny/nope.yaml", "recipes/tiny/nope.yaml does not"),
        ("memgen sft-weaver --set training.max_stepz=3", 'Unknown config key "training.max_stepz"'),
        ("memgen grpo-weaver --recipe recipes/tiny/grpo-weaver.yaml --set nope=1", '"nope"'),
        ("memgen sft-weaver --task-option nokey", "expects key=value"),
        (".venv/bin/python benchmarks/passes.py --repeats 3", "unrecognized arguments: --repeats"),
        ("python benchmarks/passes.py --repeat x", "invalid int value: 'x'"),
        ("python benchmarks/quality.py --markdown README.md", "add --table"),
        ("python benchmarks/nope.py --x 1", "no script benchmarks/nope.py"),
        ("make tests", 'no make target "tests"'),
    ],
)
def test_checker_names_what_is_broken(line, expected):
    (cmd,) = DOC.commands_in(f"```bash\n{line}\n```\n", "bad.md")
    found = problems(cmd)
    assert any(expected in p for p in found), found


def test_checking_runs_no_stage(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran while its command was only being checked")

    for stage in (evaluate, sft_weaver):
        monkeypatch.setattr(stage, "run", refuse)
    line = (
        "memgen eval --data gym:chain_sum --limit 2\nmemgen sft-weaver --set training.max_steps=1"
    )
    for cmd in DOC.commands_in(f"```bash\n{line}\n```\n", "ok.md"):
        assert problems(cmd) == []


HEAVY_RUNS = """\
```bash
memgen sft-weaver --recipe recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml
memgen baseline sft --recipe recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml
memgen eval --data gym:basic_arithmetic --limit 400
memgen sft-weaver --recipe recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml
memgen eval --data gym:chain_sum --artifact runs/absent --limit 400
make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" test
```
"""


def test_the_ledger_records_runs_and_lists_what_has_not_run(monkeypatch, tmp_path):
    found = DOC.commands_in(HEAVY_RUNS, "x.md")
    assert [DOC.classify(c) for c in found] == ["train", "train", "slow", "train", "slow", "gpu"]
    # The weaver's training exits 0, LoRA's fails: only a run with rc 0 counts as run.
    fails = "import sys; sys.exit('baseline' in sys.argv)"
    monkeypatch.setattr(DOC, "launch", lambda cmd: [sys.executable, "-c", fails, *cmd.args])
    ledger = tmp_path / "ledger.jsonl"
    assert DOC.unrun(found, ledger)["left"] == {"train": 2, "slow": 2, "gpu": 1}  # no file yet
    monkeypatch.setattr(DOC, "head_commit", lambda: "abc1234")
    results = DOC.run_class(found, "train", None, timeout=60)
    assert [r["rc"] for r in results] == [0, 1, 0]
    monkeypatch.setattr(DOC, "head_commit", lambda: "def5678")  # committed during the runs
    DOC.record(results, ledger, "train")
    slow = DOC.run_class(found, "slow", None, timeout=60)
    assert slow[1]["skipped"] == "needs runs/absent"
    DOC.record(slow, ledger, "slow")
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(r["where"], r["rc"], r["class"]) for r in lines] == [
        ("x.md:2", 0, "train"),
        ("x.md:3", 1, "train"),
        ("x.md:5", 0, "train"),
        ("x.md:4", 0, "slow"),  # the skipped one is not recorded
    ]
    assert all(r["date"] and r["source"] == "doc_commands.py --run" for r in lines)
    # the commit each command ran at, not the one the ledger was written at
    assert [r["commit"] for r in lines] == ["abc1234"] * 3 + ["def5678"]
    report = DOC.unrun(found, ledger)
    assert report["ran"] == {"train": 1, "slow": 1, "gpu": 0}  # one text, shown twice
    assert report["left"] == {"train": 1, "slow": 1, "gpu": 1}
    assert report["unrun"]["train"] == [
        {"command": found[1].text, "where": ["x.md:3"]}  # failed: still to run
    ]
    assert report["unrun"]["slow"][0]["where"] == ["x.md:6"]
    # A record is matched by its text: the same command moved to another line has run.
    moved = DOC.commands_in("```bash\n\n\n" + HEAVY_RUNS.split("\n", 1)[1], "x.md")
    assert DOC.unrun(moved, ledger)["ran"] == report["ran"]
    ledger.write_text(ledger.read_text() + "not json\n")
    with pytest.raises(SystemExit, match="ledger.jsonl:5: not a ledger record"):
        DOC.read_ledger(ledger)


def test_the_projects_ledger_reads_and_each_record_says_where_it_came_from():
    """benchmarks/doc_commands_ledger.jsonl: every line a record; a command that ran names its
    place, class and source, and one entered by hand (not by ``--run``) names the note that holds it."""
    ledger = DOC.ROOT / "benchmarks" / "doc_commands_ledger.jsonl"
    records = [r for rs in DOC.read_ledger(ledger).values() for r in rs]
    assert records
    for r in records:
        assert r["where"] and r["source"], r
        assert r["class"] in {"fast", "tiny", *DOC.HEAVY}, r  # what --run runs, or gpu by hand
        if not r["source"].startswith("doc_commands.py --run"):
            assert "note" in r["source"], r


def test_a_benchmark_runs_in_the_scratch_folder_and_finds_its_linked_input(monkeypatch, tmp_path):
    # A python command used to run in the checkout, where the artifact linked into the scratch
    # folder is not: `benchmarks/generation.py --artifact runs/...` exited 2 for that reason.
    (cmd,) = DOC.commands_in(
        "```bash\n.venv/bin/python benchmarks/generation.py --artifact runs/trig --limit 32\n```\n",
        "x.md",
    )
    assert DOC.classify(cmd) == "slow" and DOC.needs(cmd) == ["runs/trig"]
    runs = tmp_path / "runs"
    (runs / "trig").mkdir(parents=True)
    (runs / "trig" / "memgen.json").write_text("{}")
    sees = (
        "import os, sys; print(os.path.isfile('runs/trig/memgen.json'), "
        "os.path.isfile('benchmarks/generation.py'), os.path.isfile('docs/results.md'), "
        "os.path.islink('README.md'), file=sys.stderr)"
    )
    monkeypatch.setattr(DOC, "launch", lambda c: [sys.executable, "-c", sees])
    (result,) = DOC.run_class([cmd], "slow", runs, timeout=60, keep=tmp_path / "kept")
    assert result["rc"] == 0
    assert result["stderr_tail"].split() == ["True", "True", "True", "False"]  # README a copy


def test_a_command_past_its_timeout_is_killed_with_the_processes_it_started(monkeypatch, tmp_path):
    # `make bench` timed out and make was killed, but its Python ran on for minutes.
    found = DOC.commands_in("```bash\nmake bench\n```\n", "docs/x.md")
    spawns = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); p.wait()"
    )
    monkeypatch.setattr(DOC, "launch", lambda c: [sys.executable, "-c", spawns])
    (result,) = DOC.run_class(found, "slow", None, timeout=3, keep=tmp_path / "kept")
    assert result["rc"] is None and result["stderr_tail"] == "timed out after 3 s"
    child = int(Path(result["log"]).read_text())

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"  # a zombie is dead, waiting for its new parent to reap it

    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child)


def test_a_kept_run_keeps_each_commands_output_and_times_out_with_its_partial_output(
    monkeypatch, tmp_path
):
    # A benchmark's figures are its stdout: a run that threw it away could say only "rc 0".
    found = DOC.commands_in(
        "```bash\n.venv/bin/python benchmarks/a.py --n 500\n"
        ".venv/bin/python benchmarks/b.py --n 500\n```\n",
        "docs/x.md",
    )
    programs = {
        "benchmarks/a.py": "import sys; print('{\"ratio\": 1.5}'); print('progress', file=sys.stderr)",
        "benchmarks/b.py": "import time; print('step 1', flush=True); time.sleep(30)",
    }
    monkeypatch.setattr(DOC, "launch", lambda c: [sys.executable, "-c", programs[c.args[0]]])
    keep = tmp_path / "kept"
    first, second = DOC.run_class(found, "slow", None, timeout=3, keep=keep)
    assert first["rc"] == 0 and first["log"] == f"{keep}/logs/docs_x.md_2.out"
    assert json.loads(Path(first["log"]).read_text()) == {"ratio": 1.5}
    assert (keep / "logs/docs_x.md_2.err").read_text() == "progress\n"
    assert first["stderr_tail"] == "progress\n"
    assert second["rc"] is None and second["stderr_tail"] == "timed out after 3 s"
    assert (keep / "logs/docs_x.md_3.out").read_text() == "step 1\n"
