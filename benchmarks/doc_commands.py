"""Every shell command that README.md and docs/**/*.md show: where it is and what running it takes.

    .venv/bin/python benchmarks/doc_commands.py                # JSON: each command, file:line, class
    .venv/bin/python benchmarks/doc_commands.py --run fast     # also run the `fast` ones for real
    .venv/bin/python benchmarks/doc_commands.py --run tiny     # also run the `tiny` trainings
    .venv/bin/python benchmarks/doc_commands.py --run slow --only 'eval.md:1[23]' --keep runs/doc
                                                               # a chosen few, outputs kept

Which text is a command: each line of a fenced code block, and each inline code span, whose
program (after any ``VAR=value`` prefixes and a ``$`` prompt) is ``memgen`` (or
``.venv/bin/memgen``, ``python -m memgen_cli``, ``torchrun … -m memgen_cli``), ``python``
(``.venv/bin/python``, ``python3``) or ``make``; other lines are output or file listings and are
left alone. A line ending in ``\\`` continues on the next; an unquoted ``#`` after a space starts a comment;
``> file`` and ``| cmd`` end the command.

Placeholders: a command holding a token that stands for something the reader fills in is a
template, listed with ``placeholder`` set and never checked or run. Such tokens are
``<anything>``, ``...`` or ``…``, and a word in capitals alone (``COMMAND``, ``DIR``, ``N``).

Classes (``classify``), so that one can run the cheap ones and know which need a GPU:

- ``gpu``: a GPU is needed: ``cuda`` in the command, a ``--base`` or a recipe whose reasoner is
  not the embedded ``smollm2-135m`` (the Qwen2.5-1.5B recipes: hub download, paper settings).
- ``tiny``: a training stage whose recipes are all under ``recipes/tiny/`` and that names no
  ``--base``: a smoke run of a few steps. As written it trains on the embedded model;
  ``--run tiny`` gives it a 2-layer model instead (below): 6 to 10 s each.
- ``train``: trains on the embedded model (a training stage, ``benchmarks/quality.py``,
  ``make demo``): minutes to hours on a CPU.
- ``slow``: trains nothing but takes long: ``eval``/``inspect-memory`` over more than
  ``FAST_LIMIT`` problems, a benchmark, the test suite.
- ``setup``: installs, deletes or rewrites the checkout (``make setup|lock|clean|format|…``).
- ``fast``: ``--help``, ``generate``, ``eval``/``inspect-memory`` with ``--limit`` of at most
  ``FAST_LIMIT``, ``baseline retrieval``, ``make lint``.
- ``mention``: an inline span naming a memgen command without options (`memgen eval`).
- ``placeholder``: a template (above).

On 2026-12-06 the docs held 218 commands: fast 36, tiny 11, train 52, slow 48, gpu 5,
setup 13, mention 43, placeholder 10 (before ``tiny``, its 11 were ``train``: 63).

``--run fast`` runs each ``fast`` command, in file order, in a scratch folder with ``recipes/``
and ``benchmarks/`` linked in and ``README.md`` and ``docs/`` copied (``make`` runs in the
checkout), the hub offline and the usual model cache (``$MEMGEN_HOME``), and reports its exit
code. An input it names (``--artifact``, ``--init``, ``--retrieval``, ``--input``, a ``.jsonl``)
comes from an earlier command's output there or, given ``--runs DIR``, is linked in from DIR
(``runs/demo/sft-weaver`` from ``DIR/demo/sft-weaver``; what the command writes stays in
scratch); without it the command is skipped and says which input it lacks. A ``--reward
module:function`` whose module is not installed is an input too (``module.py``, the reader's own
file): no doc shows one, so such a command is skipped.

``--run tiny`` runs each ``tiny`` command the same way, in file order in one scratch folder, so
that a later command finds the artifact an earlier one made (``--artifact runs/tiny``). Each gets
``--base DIR`` added: by default a 2-layer Llama with a byte-level tokenizer, built from config
into the scratch folder (the tests' ``tiny_base``), so that nothing of the embedded model is
loaded; ``--base recipe`` runs the commands as written (the recipes' embedded SmolLM2-135M),
``--base DIR`` on a model directory of one's own. Docs that write to one folder meet there: a
command whose ``--output`` exists and is not its own run stops (rc 2), as it would for a reader
following both docs; the recipes write ``runs/tiny/<stage>``.
tests/test_doc_commands.py checks every command without running it.

The ledger: ``--run … --ledger benchmarks/doc_commands_ledger.jsonl`` appends one record per
command run (its text, place, rc, seconds, class, date, commit, threads);
``--ledger benchmarks/doc_commands_ledger.jsonl --unrun`` lists the train, slow and gpu commands
that no record shows run with rc 0, matched by their text, so a command moved to another line
keeps its runs and an edited one is run again. Records whose ``source`` is not
``doc_commands.py --run`` were entered by hand from a session's closing note (runs made before
the ledger existed, or the same command run by ``make`` or in a clean clone).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs")
EMBEDDED = "smollm2-135m"
FAST_LIMIT = 100
TRAINING = {"sft-weaver", "grpo-weaver", "train-trigger", "baseline sft", "baseline grpo"}
TINY = "recipes/tiny/"
SETUP_TARGETS = {"setup", "lock", "clean", "format", "browser", "sandbox-tools"}
INPUT_OPTIONS = ("--artifact", "--init", "--retrieval", "--input")
PLACEHOLDER = re.compile(r"<[^<>]+>|\.\.\.|…|^[A-Z][A-Z0-9_]*$")
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")  # a span may wrap, not cross paragraphs
ENDS = {">", ">>", "2>", "2>&1", "|", "<"}
PROGRAMS = {
    "memgen": "memgen",
    ".venv/bin/memgen": "memgen",
    "python": "python",
    "python3": "python",
    ".venv/bin/python": "python",
    ".venv/bin/python3": "python",
    "make": "make",
    "torchrun": "torchrun",
    ".venv/bin/torchrun": "torchrun",
}
GPU = re.compile(r"cuda|/whl/cu\d+")


@dataclass
class DocCommand:
    """One command as a doc shows it. ``args`` follow the program: for memgen the (sub)command
    and its options, for python the script and its flags, for make the targets and variables."""

    file: str  # relative to the repository root
    line: int  # where the command starts (its first line when continued)
    text: str  # the command as written, continuations joined, comment left out
    program: str  # memgen | python | make
    args: list[str]
    inline: bool = False  # from an inline code span in prose, not a code block
    comment: str = ""
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # what starts the program: ["torchrun", …]
    placeholder: str | None = None  # the token that makes this a template

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def mention(self) -> bool:
        """An inline span naming a memgen command without running it: `memgen eval`."""
        return self.inline and self.program == "memgen" and not any(a[:1] == "-" for a in self.args)

    @property
    def path(self) -> str:
        """The memgen (sub)command: "eval", "baseline sft"; the script; make's targets."""
        if self.program == "memgen":
            words = []
            for arg in self.args:
                if arg.startswith("-") or len(words) == 2:
                    break
                words.append(arg)
                if arg != "baseline":
                    break
            return " ".join(words)
        return self.args[0] if self.args else ""


# ----------------------------------------------------------------------------- extraction
def doc_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def extract(root: Path = ROOT) -> list[DocCommand]:
    """Every command of every doc, in file order."""
    found = []
    for path in doc_files(root):
        found += commands_in(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    return found


def commands_in(markdown: str, file: str) -> list[DocCommand]:
    """The commands in one Markdown text: code-block lines, then inline code spans."""
    found, prose, in_block, pending, start = [], [], False, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            in_block, pending = not in_block, ""
            prose.append("")
            continue
        prose.append("" if in_block else line)
        if not in_block:
            continue
        if not pending:
            start = number
        code, _ = split_comment(line.strip())
        if code.endswith("\\"):
            pending += code[:-1].rstrip() + " "
            continue
        found += parse_line(pending + line.strip(), file, start)
        pending = ""
    text = "\n".join(prose)  # code blocks blanked, so that offsets keep their line numbers
    for span in INLINE.finditer(text):
        number = text.count("\n", 0, span.start()) + 1
        found += parse_line(" ".join(span[1].split()), file, number, inline=True)
    return sorted(found, key=lambda command: command.line)


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: a ``#`` outside quotes after a space starts a comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def parse_line(line: str, file: str, number: int, inline: bool = False) -> list[DocCommand]:
    """The commands on one (joined) line, or none when its program is not one of ours."""
    code, comment = split_comment(line.strip())
    code = code.removeprefix("$ ").strip()
    try:
        tokens = shlex.split(code)
    except ValueError:  # unbalanced quotes: prose, not a command
        return []
    commands, current = [], []
    for token in tokens:
        if token == "&&" or token == ";":
            commands.append(current)
            current = []
        elif token in ENDS or token.startswith(">"):
            break
        else:
            current.append(token)
    commands.append(current)
    found = []
    for words in commands:
        command = from_words(words, file, number, inline, comment)
        if command is not None:
            command.text = code
            found.append(command)
    return found


def from_words(words, file, number, inline, comment) -> DocCommand | None:
    env = {}
    while words and ENV_PREFIX.match(words[0]):
        key, value = words[0].split("=", 1)
        env[key] = value
        words = words[1:]
    if not words:
        return None
    head = PROGRAMS.get(words[0])
    start = words.index("memgen_cli") + 1 if "memgen_cli" in words else 0
    if head in ("torchrun", "python") and start and words[start - 2] == "-m":
        head = "memgen"  # torchrun … -m memgen_cli, python -m memgen_cli
    elif head == "torchrun" or (head == "python" and (len(words) < 2 or words[1][:1] == "-")):
        return None  # torchrun or python running something else
    else:
        start = 1
    if head is None or len(words) == start:
        return None  # not one of ours, or the program alone (`memgen` in prose)
    found = DocCommand(file, number, "", head, words[start:], inline, comment, env, words[:start])
    found.placeholder = next((w for w in words if PLACEHOLDER.search(w)), None)
    return found


# ----------------------------------------------------------------------------- classes
def option_values(args: list[str], name: str) -> list[str]:
    """Every value of option ``name`` (``--x v`` and ``--x=v``), comma lists split."""
    values = []
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
    return [v for value in values for v in value.split(",") if v]


@functools.cache
def recipe_base(recipe: str, root: Path = ROOT) -> tuple[str, str]:
    """(model.base, model.device) of a recipe file, the defaults where it says nothing."""
    try:
        model = (yaml.safe_load((root / recipe).read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError):
        return EMBEDDED, "auto"
    return str(model.get("base", EMBEDDED)), str(model.get("device", "auto"))


def classify(cmd: DocCommand, root: Path = ROOT) -> str:
    if cmd.placeholder:
        return "placeholder"
    if cmd.mention:
        return "mention"
    args = cmd.args
    recipes = [recipe_base(recipe, root) for recipe in option_values(args, "--recipe")]
    bases = option_values(args, "--base") + [base for base, _ in recipes]
    if any(GPU.search(a) for a in args) or any(device.startswith("cuda") for _, device in recipes):
        return "gpu"
    if any(base != EMBEDDED and not (root / base).exists() for base in bases):
        return "gpu"  # a hub model: the Qwen2.5-1.5B recipes (paper settings)
    if cmd.program == "make":
        targets = {a for a in args if not a.startswith("-") and "=" not in a} or {"setup"}
        if targets & SETUP_TARGETS:
            return "setup"
        if "demo" in targets:
            return "train"
        return "fast" if targets <= {"lint"} else "slow"
    if cmd.program == "python":
        if Path(cmd.path).name == "doc_commands.py" and "--run" not in args:
            return "fast"  # this listing
        return "train" if Path(cmd.path).name == "quality.py" else "slow"
    if "--help" in args or "-h" in args or cmd.path == "baseline retrieval":
        return "fast"
    if cmd.path in TRAINING:
        recipes = option_values(args, "--recipe")
        tiny = recipes and all(r.startswith(TINY) for r in recipes)
        return "tiny" if tiny and not option_values(args, "--base") else "train"
    if cmd.path in ("eval", "inspect-memory") and "--prompt" not in args:
        limits = option_values(args, "--limit")
        small = limits and limits[-1].isdigit() and int(limits[-1]) <= FAST_LIMIT
        return "fast" if small else "slow"
    return "fast"


def needs(cmd: DocCommand) -> list[str]:
    """Paths a command reads that some other command (or the reader) makes: artifacts, inputs."""
    paths = [v for name in INPUT_OPTIONS for v in option_values(cmd.args, name)]
    paths += [v for v in option_values(cmd.args, "--data") if v.endswith(".jsonl")]
    paths += [
        o.split("=", 1)[1]
        for o in option_values(cmd.args, "--task-option")
        if o.startswith("path=")
    ]
    for reward in option_values(cmd.args, "--reward"):  # the reader's own module: my_rewards.py
        module = reward.split(":", 1)[0]
        if module and importlib.util.find_spec(module.split(".")[0]) is None:
            paths.append(module.replace(".", "/") + ".py")
    return paths


def listing(commands: list[DocCommand], root: Path = ROOT) -> dict:
    rows = []
    for cmd in commands:
        row = {"where": cmd.where, "command": cmd.text, "comment": cmd.comment}
        row |= {"inline": cmd.inline, "placeholder": cmd.placeholder}
        row |= {"class": classify(cmd, root), "needs": needs(cmd)}
        rows.append(row)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    return {"counts": counts, "commands": rows}


# ----------------------------------------------------------------------------- --run fast|tiny
def run_class(
    commands: list[DocCommand],
    kind: str,
    runs: Path | None,
    timeout: float,
    base: str | None = None,
    only: str | None = None,
    keep: Path | None = None,
) -> list[dict]:
    """Run each command of class ``kind`` for real, in file order, in one scratch folder; its
    rc, seconds, stderr tail. ``base``: a ``--base`` to add to each memgen command
    (``tiny_base`` builds the 2-layer model in the scratch folder; None adds none). ``only``:
    just the commands whose place or text matches this regular expression. ``keep``: this
    folder is the scratch folder and stays (a later run finds what this one made, and each
    command's stdout and stderr are in its ``logs/<file>_<line>.out`` and ``.err``)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="memgen-doc-commands-") as temporary:
        scratch = Path(keep or temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        furnish(scratch)
        env = os.environ | {"HF_HUB_OFFLINE": "1"}  # the usual model cache ($MEMGEN_HOME)
        chosen = [cmd for cmd in commands if classify(cmd) == kind]
        if only:
            chosen = [c for c in chosen if re.search(only, c.where) or re.search(only, c.text)]
        if base == "tiny_base" and chosen:
            base = str(tiny_base(scratch / "tiny-base"))
        for cmd in chosen:
            # The commit and date as it starts: the checkout may move on during an hours-long run.
            result = {"where": cmd.where, "command": cmd.text, "commit": head_commit()}
            result["date"] = time.strftime("%Y-%m-%d")
            missing = [p for p in needs(cmd) if not link_input(p, scratch, runs)]
            if missing:
                results.append(result | {"rc": None, "skipped": f"needs {', '.join(missing)}"})
                continue
            argv, cwd = launch(cmd), scratch
            if base and cmd.program == "memgen":
                argv += ["--base", base]
                result["base"] = base
            if cmd.program == "make":
                cwd = ROOT  # make lint and the listing read the checkout itself
            log = scratch / "logs" / re.sub(r"[^\w.-]", "_", cmd.where)
            log.parent.mkdir(exist_ok=True)
            started = time.perf_counter()
            with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
                # to files as it runs: a long command's progress can be followed there
                rc = run_group(argv, cwd, env | cmd.env, out, err, timeout)
                tail = None if rc is not None else f"timed out after {timeout:.0f} s"
            seconds = round(time.perf_counter() - started, 1)
            tail = tail or Path(f"{log}.err").read_text(errors="replace")[-600:]
            results.append(
                result | {"rc": rc, "seconds": seconds, "stderr_tail": tail, "log": f"{log}.out"}
            )
            print(f"{cmd.where}: rc {rc} in {seconds} s (output: {log}.out, .err)", file=sys.stderr)
    return results


def run_group(argv: list[str], cwd: Path, env: dict, out, err, timeout: float) -> int | None:
    """Run ``argv`` in its own process group, "/exit" on its stdin (generate --interactive:
    leave at once); its exit code, or None when it ran past ``timeout``, and then the whole
    group is killed: `make bench`'s Python, or a torchrun's workers, do not outlive it."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        text=True,
        start_new_session=True,
    )
    try:
        proc.communicate("/exit\n", timeout=timeout)
        return proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def furnish(scratch: Path) -> None:
    """What a command finds in the scratch folder besides its inputs: ``recipes/`` and
    ``benchmarks/`` linked in, and copies of ``README.md`` and ``docs/``, so that a benchmark
    that rewrites a Markdown block (``--markdown README.md``) rewrites the copy."""
    for name in ("recipes", "benchmarks"):
        if not (scratch / name).exists():
            (scratch / name).symlink_to(ROOT / name)
    if not (scratch / "README.md").exists():
        shutil.copy2(ROOT / "README.md", scratch / "README.md")
    if not (scratch / "docs").exists():
        shutil.copytree(ROOT / "docs", scratch / "docs")


def tiny_base(path: Path) -> Path:
    """A 2-layer Llama with a byte-level ChatML tokenizer, built from config and saved at
    ``path`` (``--base path``): the tests' ``tiny_base`` (tests/helpers.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from helpers import save_tiny_base
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return save_tiny_base(path)


def link_input(path: str, scratch: Path, runs: Path | None) -> bool:
    """Whether ``path`` is there in ``scratch``: made by an earlier command, or linked in from
    ``runs`` (the artifact itself, so that what a command writes beside it stays in scratch)."""
    if (scratch / path).exists():
        return True
    parts = Path(path).parts
    source = runs.joinpath(*parts[1:]) if runs and parts[0] == "runs" else None
    if source is None or not source.exists():
        return False
    (scratch / path).parent.mkdir(parents=True, exist_ok=True)
    (scratch / path).symlink_to(source.resolve())
    return True


def launch(cmd: DocCommand) -> list[str]:
    """The argv that runs ``cmd`` with this interpreter (and its venv's torchrun)."""
    head = PROGRAMS[cmd.prefix[0]]
    if head == "torchrun":
        return [str(Path(sys.executable).with_name("torchrun")), *cmd.prefix[1:], *cmd.args]
    if head in ("memgen", "python") and cmd.program == "memgen":
        return [sys.executable, "-m", "memgen_cli", *cmd.args]
    return [sys.executable if head == "python" else head, *cmd.args]


# ----------------------------------------------------------------------------- the ledger
HEAVY = ("train", "slow", "gpu")


def head_commit() -> str | None:
    """The checkout's commit (short), None outside git."""
    return (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or None
    )


def record(results: list[dict], ledger: Path, kind: str) -> None:
    """Append each command that ran (skipped ones did not) to the JSON-lines ``ledger`` with
    its class, the date and the checkout's commit when it started (``run_class`` notes them;
    else now) and the thread count it ran at."""
    stamp = {
        "class": kind,
        "date": time.strftime("%Y-%m-%d"),
        "commit": head_commit(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "source": "doc_commands.py --run",
    }
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a", encoding="utf-8") as out:
        for result in results:
            if "skipped" not in result:
                row = {k: result.get(k) for k in ("where", "command", "rc", "seconds")}
                started = {k: result[k] for k in ("date", "commit") if result.get(k)}
                out.write(json.dumps(row | stamp | started, ensure_ascii=False) + "\n")


def read_ledger(ledger: Path) -> dict[str, list[dict]]:
    """The ledger's records by command text, oldest first (no file: none)."""
    runs: dict[str, list[dict]] = {}
    if ledger.exists():
        for n, line in enumerate(ledger.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                    runs.setdefault(entry["command"], []).append(entry)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f"{ledger}:{n}: not a ledger record: {line[:80]}") from None
    return runs


def unrun(commands: list[DocCommand], ledger: Path) -> dict:
    """The train, slow and gpu commands that no ledger record shows run with rc 0, by class,
    each text once (with every place it is shown), and how many of each class have run."""
    runs = read_ledger(ledger)
    left: dict[str, dict[str, list[str]]] = {kind: {} for kind in HEAVY}
    ran: dict[str, set[str]] = {kind: set() for kind in HEAVY}
    for cmd in commands:
        kind = classify(cmd)
        if kind not in HEAVY:
            continue
        if any(entry.get("rc") == 0 for entry in runs.get(cmd.text, [])):
            ran[kind].add(cmd.text)
        else:
            left[kind].setdefault(cmd.text, []).append(cmd.where)
    return {
        "ran": {kind: len(texts) for kind, texts in ran.items()},
        "left": {kind: len(texts) for kind, texts in left.items()},
        "unrun": {
            kind: [{"command": text, "where": places} for text, places in texts.items()]
            for kind, texts in left.items()
        },
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run", choices=["fast", "tiny", "slow", "train"], help="run the commands of this class"
    )
    p.add_argument("--only", help="with --run: only commands whose place or text matches (regex)")
    p.add_argument("--keep", type=Path, help="with --run: the scratch folder, kept afterwards")
    p.add_argument("--runs", type=Path, help="with --run: a runs/ folder whose artifacts to use")
    p.add_argument("--timeout", type=float, default=900, help="with --run: seconds per command")
    p.add_argument(
        "--base",
        default="tiny",
        help="with --run tiny: the --base each command gets: tiny (a 2-layer model built from "
        "config), recipe (none: the recipe's own, the embedded model), or a model directory",
    )
    p.add_argument(
        "--ledger",
        type=Path,
        help="a JSON-lines record of runs (the project's: benchmarks/doc_commands_ledger.jsonl): "
        "with --run, each command that ran is appended; with --unrun, read",
    )
    p.add_argument(
        "--unrun",
        action="store_true",
        help="with --ledger: only the train, slow and gpu commands no record shows run with rc 0",
    )
    args = p.parse_args(argv)
    if args.unrun and not args.ledger:
        p.error("--unrun reads a ledger: add --ledger benchmarks/doc_commands_ledger.jsonl")
    commands = extract()
    if args.unrun:
        print(json.dumps(unrun(commands, args.ledger), indent=1, ensure_ascii=False))
        return
    report = listing(commands)
    if args.run:
        base = None
        if args.run == "tiny" and args.base != "recipe":
            base = "tiny_base" if args.base == "tiny" else str(Path(args.base).resolve())
        report["run"] = run_class(
            commands, args.run, args.runs, args.timeout, base, args.only, args.keep
        )
        if args.ledger:
            record(report["run"], args.ledger, args.run)
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
