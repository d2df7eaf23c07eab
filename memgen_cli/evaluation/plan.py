"""What an eval runs: the artifacts and their memory modes, the tasks and their options, and
the batches each task's problems are cut into.

Everything here is checked before any model is loaded; a request that cannot run fails with
one message that says why and what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from memgen_cli.artifacts import BASELINE_NAMES, read_manifest, require_kind
from memgen_cli.config import MEMORY_MODES
from memgen_cli.data import Example
from memgen_cli.errors import MemgenError, did_you_mean


@dataclass
class Entry:
    """One model under evaluation: an artifact (or the plain reasoner) and its memory modes."""

    label: str | None  # the artifact path as given ("W+R": weaver W with retrieval R); None: plain
    path: Path | None
    manifest: dict | None
    modes: list[str]
    retrieval: Path | None = None  # a retrieval artifact whose examples go before each question

    @property
    def is_baseline(self) -> bool:
        return bool(self.manifest and self.manifest.get("kind") == "baseline")

    @property
    def is_retrieval(self) -> bool:
        """A retrieval artifact alone: the plain reasoner, its examples in the prompt."""
        return bool(self.manifest and self.manifest.get("kind") == "retrieval")

    @property
    def has_memory(self) -> bool:
        return self.manifest is not None and not (self.is_baseline or self.is_retrieval)


def artifact_paths(artifact) -> list[Path]:
    """``--artifact a --artifact b,c`` -> [a, b, c] (order kept, repeats dropped)."""
    items = artifact if isinstance(artifact, (list, tuple)) else [artifact]
    specs = [s.strip() for item in items if item is not None for s in str(item).split(",")]
    return [Path(s) for s in dict.fromkeys(s for s in specs if s)]


def asked_modes(memory: str | None) -> list[str]:
    return [m.strip() for m in (memory or "").split(",") if m.strip()]


def plan_entries(
    paths: list[Path], memory: str | None, notes: Console, retrieval: Path | None = None
) -> list[Entry]:
    """What runs: without artifacts the plain reasoner (memory off); a weaver artifact in the
    modes asked for (default: off + every mode it supports); a baseline (LoRA, prompt or
    prefix tuning) as the adapted reasoner, and a retrieval artifact as the plain reasoner
    with its examples in the prompt, mode off only (neither has memory). ``retrieval`` (eval
    --retrieval R): each weaver also runs, in the same modes, with R's examples in the prompt
    (an entry labelled "W+R" right after W's)."""
    if not paths:
        if retrieval is not None:
            raise MemgenError(
                f"--retrieval {retrieval} puts its examples before a weaver's questions: give the "
                "weaver with --artifact. To evaluate the retrieval baseline alone, pass it to "
                "--artifact."
            )
        return [Entry(None, None, None, parse_modes(memory, None, notes))]
    if retrieval is not None:
        require_kind(read_manifest(retrieval), retrieval, "retrieval")
    kinds = {p: read_manifest(p).get("kind", "weaver") for p in paths}
    weavers = [p for p in paths if kinds[p] not in ("baseline", "retrieval")]
    if retrieval is not None and not weavers:
        raise MemgenError(
            f"--retrieval {retrieval} combines retrieved examples with a weaver's memory, and no "
            "--artifact is a weaver; pass the retrieval artifact to --artifact to evaluate it "
            "alone."
        )
    triggered = [p for p in weavers if read_manifest(p)["trigger"].get("trained")]
    entries = []
    for path in paths:
        manifest = read_manifest(path)
        if kinds[path] == "baseline":
            entries.append(Entry(str(path), path, manifest, ["off"]))
        elif kinds[path] == "retrieval":
            entries.append(Entry(str(path), path, manifest, ["off"], retrieval=path))
        elif triggered and path not in triggered and "full" in asked_modes(memory):
            # Several artifacts: full runs where there is a trained trigger to run it.
            rest = ",".join(m for m in memory.split(",") if m.strip() != "full")
            notes.print(f"{path}: no trained trigger, so no memory full row for it.")
            if rest.strip(", "):
                entries.append(Entry(str(path), path, manifest, parse_modes(rest, manifest, notes)))
        else:
            entries.append(Entry(str(path), path, manifest, parse_modes(memory, manifest, notes)))
        if retrieval is not None and path in weavers:
            last = entries[-1] if entries and entries[-1].path == path else None
            if last is not None:
                label = f"{path}+{retrieval}"
                entries.append(Entry(label, path, manifest, list(last.modes), retrieval=retrieval))
    asked = [m for m in (memory or "").split(",") if m.strip() and m.strip() != "off"]
    if asked and not any(e.has_memory for e in entries):
        names = " and ".join(dict.fromkeys(no_memory_name(e) for e in entries))
        raise MemgenError(
            f"--memory {','.join(asked)} needs a weaver artifact; {names} have no memory and "
            "run with memory off (a baseline as the adapted reasoner, a retrieval artifact as "
            "the plain reasoner with its examples). Drop --memory, or add a weaver."
        )
    if any(e.is_baseline for e in entries) and len(entries) > 1:
        notes.print("Baselines run as the adapted reasoner (memory off).")
    if any(e.is_retrieval for e in entries) and len(entries) > 1:
        notes.print(
            "Retrieval artifacts run as the plain reasoner with their examples (memory off)."
        )
    return entries


def no_memory_name(entry: Entry) -> str:
    """What an entry without memory is, in the plural: "LoRA baselines", "retrieval artifacts"."""
    if entry.is_retrieval:
        return "retrieval artifacts"
    return f"{BASELINE_NAMES[entry.manifest['method']]} baselines"


def parse_modes(memory: str | None, manifest: dict | None, notes: Console) -> list[str]:
    """The memory modes to compare. Default: off, plus weaver (and full when the artifact has
    a trained trigger). Asking for weaver/full without an artifact is an error, not a silent
    memory-off run that would be mistaken for the comparison that was asked for."""
    has_trigger = bool(manifest and manifest["trigger"].get("trained"))
    if memory is None:
        if manifest is None:
            notes.print(
                "[yellow]No --artifact: only memory off (the plain reasoner) is evaluated.[/]"
            )
            return ["off"]
        return ["off", "weaver"] + (["full"] if has_trigger else [])
    modes = list(dict.fromkeys(m.strip() for m in memory.split(",") if m.strip()))
    for mode in modes:
        if mode not in MEMORY_MODES:
            raise MemgenError(
                f'unknown memory mode "{mode}"; use a comma-separated list of {", ".join(MEMORY_MODES)}.'
                + did_you_mean(mode, MEMORY_MODES)
            )
    if not modes:
        raise MemgenError(f"--memory needs at least one of {', '.join(MEMORY_MODES)}.")
    wanted = [m for m in modes if m != "off"]
    if wanted and manifest is None:
        raise MemgenError(
            f"--memory {','.join(wanted)} needs a trained weaver: pass --artifact DIR. "
            "Without an artifact only off (the plain reasoner) is available."
        )
    if "full" in modes and not has_trigger:
        raise MemgenError(
            "--memory full needs a trained trigger, and this artifact has none. Compare "
            "--memory off,weaver, or train one with `memgen train-trigger`."
        )
    return modes


# --------------------------------------------------------------------------- tasks
def parse_specs(data: list[str]) -> list[str]:
    """``--data a --data b,c`` -> [a, b, c], duplicates dropped, order kept."""
    specs = [s.strip() for item in data for s in item.split(",") if s.strip()]
    if not specs:
        raise MemgenError(
            "--data needs at least one task (e.g. --data gsm8k or --data path/to/test.jsonl)."
        )
    return list(dict.fromkeys(specs))


def task_options(label: str, given: dict, manifests: list[dict], notes: Console) -> dict:
    """Options for one task: for the task an artifact trained on, the options it recorded (its
    difficulty, its turn limit, say), so that it is evaluated on the same kind of problem it
    learned from, on held-out seeds; those given with --task-option are merged over them key by
    key, as training merges them over a recipe's (a given key replaces the recorded one, the
    others stay). Another task gets only the given options."""
    for manifest in manifests:
        training = manifest.get("training") or {}
        recorded = training.get("task_options")
        if recorded and training.get("task") in (label, f"gym:{label}"):
            merged = {**recorded, **given}
            kept = {k: v for k, v in recorded.items() if k not in given}
            if not given:
                notes.print(f"{display_name(label)}: task options from the artifact: {recorded}")
            elif kept:
                notes.print(
                    f"{display_name(label)}: task options {merged} "
                    f"(from the artifact: {', '.join(kept)})"
                )
            return merged
    return given


def parse_task_options(items: list[str]) -> dict:
    """``["grader=numeric", "columns.prompt=problem"]`` -> {"grader": "numeric",
    "columns": {"prompt": "problem"}}; values are read as YAML (numbers, lists, mappings)."""
    options: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MemgenError(f'--task-option expects key=value, got "{item}".')
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MemgenError(f'--task-option "{item}" conflicts with an earlier option.')
        node[leaf] = value
    return options


def display_name(label: str) -> str:
    """A task's display name: a data file by its file name."""
    return Path(label).name if "/" in label else label


# --------------------------------------------------------------------------- batches
@dataclass
class Problem:
    """One problem of a task as the model is asked it."""

    index: int  # position in the task's problem list
    example: Example
    messages: list[dict]
    retrieved: list[str] | None = None  # ids of the retrieved examples in ``messages``, if any


def make_batches(tokenizer, items: list[Problem], batch_size: int) -> list[list[Problem]]:
    """Batches of similar prompt length (less padding), longest first (a memory error shows
    at once, and the time estimate errs on the safe side)."""

    def length(item: Problem) -> int:
        text = tokenizer.apply_chat_template(
            item.messages, tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    ordered = sorted(items, key=length, reverse=True)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
