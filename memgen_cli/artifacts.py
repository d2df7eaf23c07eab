"""Self-describing artifacts: save and load a weaver (and trigger), or a LoRA baseline, as
safetensors + manifest.

Weaver layout (kind ``weaver``, or ``memgen`` once a trigger is trained; a directory, written
atomically: temporary directory, then swapped in by ``atomic.swap_in``)::

    memgen.json                      manifest (format, base fingerprint, settings, lineage)
    weaver/adapter_config.json       PEFT adapter, loadable with PeftModel.from_pretrained
    weaver/adapter_model.safetensors
    weaver.safetensors               query latents, norms, scales, projections
    trigger.safetensors              only when a trigger has been trained
    recipe.yaml                      the resolved configuration that produced it
    metrics.jsonl                    the training log, when there is one

Baseline layout (kind ``baseline``, from ``memgen baseline``: a LoRA adapter on the reasoner
itself, no memory; the directory *is* a PEFT adapter, ``PeftModel.from_pretrained(base, DIR)``)::

    memgen.json                      manifest (format, base fingerprint, LoRA settings, budget)
    adapter_config.json
    adapter_model.safetensors
    recipe.yaml, metrics.jsonl       as above

Each kind is refused, with a message saying which command makes the right one, where the
other is required. Writing never destroys what memgen did not write: ``check_output`` lets an
``--output`` path be replaced only when it holds memgen's own output (an artifact, or the eval,
inspect-memory or generate output that marks itself so) and the user passed --overwrite.
Nothing is pickled. Loading validates the manifest, the file set, every tensor's shape and the
base model's fingerprint, and says precisely what differs and what to do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memgen_cli import __version__, atomic
from memgen_cli.config import MemoryConfig, from_dict, to_dict
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.models.memgen import ADAPTER, MemGenModel
from memgen_cli.versions import environment_versions

FORMAT_VERSION = 1
MANIFEST = "memgen.json"
WEAVER_FILES = (
    "weaver/adapter_config.json",
    "weaver/adapter_model.safetensors",
    "weaver.safetensors",
)
TRIGGER_FILE = "trigger.safetensors"
BASELINE_FILES = ("adapter_config.json", "adapter_model.safetensors")


@contextlib.contextmanager
def atomic_dir(target: str | Path, kind: str = "artifact"):
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    A crash or Ctrl-C inside the block, or during the swap, leaves ``target`` exactly as it
    was. ``kind`` names what is written: ``artifact``, or an output kind of ``OUTPUTS`` (those
    get a marker file naming the kind and the files). An existing ``target`` is replaced only
    where ``check_output`` would allow it with --overwrite: commands ask the user when they
    validate their options; this refuses a folder that is not memgen's even if one forgot.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_output(target, kind=kind, overwrite=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if kind != "artifact":
            files = sorted(p.name for p in tmp.iterdir())
            marker = {"kind": kind, "memgen_version": __version__, "files": files}
            (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        check_output(target, kind=kind, overwrite=True)  # as it is now, not as it was
        atomic.swap_in(tmp, target)  # the old target, if any, is now at tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_output(path: str | Path, data: str | bytes, *, kind: str) -> Path:
    """Write an output file of ``kind`` (``generate``, ``html``) atomically, refusing to
    replace a file that is not memgen's (see ``check_output``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output(path, kind=kind, overwrite=True)
    atomic.write_file(path, data)
    return path


# --------------------------------------------------------------------------- output guard
OUTPUT_MARKER = "memgen-output.json"
# What memgen writes at the top of an artifact directory; anything else there is the user's.
ARTIFACT_ENTRIES = frozenset(
    {MANIFEST, TRIGGER_FILE, "recipe.yaml", "metrics.jsonl", "completions", *BASELINE_FILES}
    | {name.split("/")[0] for name in WEAVER_FILES}
)
OUTPUTS = {  # kind -> what it is called in messages
    "artifact": "memgen artifact",
    "eval": "memgen eval output",
    "inspect-memory": "memgen inspect-memory output",
    "generate": "memgen generate answers file",
    "html": "memgen inspect-memory page",
}
# How a file output is recognised: the fields of each line ``stages/generate.record`` writes;
# the title ``inspection/html.page`` writes.
ANSWER_FIELDS = frozenset({"prompt", "completion", "memory", "insertions"})
HTML_TITLE = b"<title>memgen inspect-memory</title>"


def check_output(path: str | Path, *, kind: str, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an output path where writing would destroy something that is not memgen's.

    A new path, an empty folder or an empty file is free. An existing one is replaced only when
    it holds memgen's own output of ``kind`` (any artifact for the training stages; an earlier
    eval, inspect-memory or generate output for those commands), with nothing else beside it,
    and ``overwrite`` (--overwrite, or a training stage's --resume) says the user agrees.
    Commands call this when they validate their options, before any model is loaded.
    """
    path, what = Path(path), OUTPUTS[kind]
    if path.is_symlink():
        raise MemgenError(
            f"{flag} {path} is a symbolic link; give the path it points to ({path.resolve()})."
        )
    if not path.exists():
        return
    if kind in ("generate", "html"):
        _check_file(path, kind, overwrite, flag)
        return
    if not path.is_dir():
        raise MemgenError(
            f"{flag} {path} is a file, not a folder; choose a new path or remove it yourself."
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    found, ours = output_kind(path)
    if found != kind:
        held = f"a {OUTPUTS[found]}" if found else _listing(entries)
        raise MemgenError(
            f"{flag} {path}: the folder exists and is not a {what} (it holds {held}); "
            "choose a new path or remove it yourself."
        )
    foreign = [name for name in entries if name not in ours]
    if foreign:
        raise MemgenError(
            f"{flag} {path} holds a {what}, and also {_listing(foreign)}, which memgen did not "
            "write; move those out or choose a new path."
        )
    if not overwrite:
        raise MemgenError(f"{flag} {path} holds a {what}; pass --overwrite to replace it.")


def output_kind(path: Path) -> tuple[str | None, frozenset[str]]:
    """The memgen output a folder holds (a kind of ``OUTPUTS``, None if none) and the names
    memgen wrote in it."""
    manifest = _json_object(path / MANIFEST)
    if manifest is not None and "format_version" in manifest:
        return "artifact", ARTIFACT_ENTRIES
    marker = _json_object(path / OUTPUT_MARKER)
    if marker is not None and marker.get("kind") in OUTPUTS and marker["kind"] != "artifact":
        files = [f for f in marker.get("files", []) if isinstance(f, str)]
        return marker["kind"], frozenset([OUTPUT_MARKER, *files])
    return None, frozenset()


def _check_file(path: Path, kind: str, overwrite: bool, flag: str) -> None:
    what = OUTPUTS[kind]
    if path.is_dir():
        raise MemgenError(f"{flag} {path} is a folder; give the path of a file to write.")
    if not path.is_file():
        raise MemgenError(f"{flag} {path} is not a regular file; choose a new path.")
    if path.stat().st_size == 0:
        return
    ours = _is_answers_file(path) if kind == "generate" else _is_inspect_page(path)
    if not ours:
        raise MemgenError(
            f"{flag} {path}: the file exists and is not a {what}; choose a new path or remove "
            "it yourself."
        )
    if not overwrite:
        raise MemgenError(f"{flag} {path} holds a {what}; pass --overwrite to replace it.")


def _is_answers_file(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                return False
            if not isinstance(row, dict) or not ANSWER_FIELDS <= row.keys():
                return False
    return True


def _is_inspect_page(path: Path) -> bool:
    with path.open("rb") as page:
        return HTML_TITLE in page.read(4096)


def _json_object(file: Path) -> dict | None:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, a folder, unreadable, not JSON
        return None
    return value if isinstance(value, dict) else None


def _listing(names: list[str], shown: int = 3) -> str:
    """'a, b, c and 4 more'."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more"


def artifact_digest(path: str | Path) -> str:
    """sha256 over the artifact's tensors and manifest (its identity as a parent)."""
    path = Path(path)
    h = hashlib.sha256()
    for name in (MANIFEST, *WEAVER_FILES, TRIGGER_FILE, *BASELINE_FILES):
        if (path / name).exists():
            h.update(name.encode())
            h.update((path / name).read_bytes())
    return h.hexdigest()


def save_artifact(
    model: MemGenModel,
    base: LoadedBase,
    out: str | Path,
    *,
    prompt: dict | None = None,
    recipe_yaml: str | None = None,
    training: dict | None = None,
    parent: str | Path | None = None,
    metrics_file: str | Path | None = None,
    weaver_base: LoadedBase | None = None,
) -> Path:
    """Write the artifact directory atomically and return its path."""
    out = Path(out)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "memgen" if model.trigger.is_trained else "weaver",
        "memgen_version": __version__,
        "versions": environment_versions(),  # python and the libraries that made it
        "reasoner": {
            "name": base.name,
            "source": base.source,
            "fingerprint": base.fingerprint,
        },
        "weaver_backbone": {
            "shared": model.shared,
            "name": base.name if model.shared else weaver_base.name,
            "fingerprint": base.fingerprint if model.shared else weaver_base.fingerprint,
        },
        "memory": to_dict(model.cfg),
        "prompt": {"chat_template": model.tokenizer.chat_template, **(prompt or {})},
        "trigger": {"trained": model.trigger.is_trained},
        "tensors": {
            "weaver": {k: list(v.shape) for k, v in model.weaver.state_dict().items()},
            "trigger": {k: list(v.shape) for k, v in model.trigger.state_dict().items()},
        },
        "parent": _parent(parent),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training": training or {},
    }
    with atomic_dir(out) as tmp:
        scratch = tmp / ".peft"
        model.peft.save_pretrained(scratch, selected_adapters=[ADAPTER])
        os.replace(scratch / ADAPTER, tmp / "weaver")
        shutil.rmtree(scratch)
        save_file(_contiguous(model.weaver.state_dict()), tmp / "weaver.safetensors")
        if model.trigger.is_trained:
            save_file(_contiguous(model.trigger.state_dict()), tmp / TRIGGER_FILE)
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        if metrics_file is not None and Path(metrics_file).exists():
            shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _parent(parent) -> dict | None:
    if parent is None:
        return None
    return {"name": str(parent), "sha256": artifact_digest(parent)}


def read_manifest(path: str | Path) -> dict:
    """Read and validate ``memgen.json`` and the file set; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise MemgenError(f"Artifact {path} does not exist (expected a directory with {MANIFEST}).")
    file = path / MANIFEST
    if not file.exists():
        raise MemgenError(f"{path} is not a memgen artifact: {MANIFEST} is missing.")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MemgenError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    if not isinstance(manifest, dict):
        raise MemgenError(f"{file} must hold a JSON object.")
    version = manifest.get("format_version")
    manifest.setdefault("kind", "weaver")
    if version != FORMAT_VERSION:
        raise MemgenError(
            f"{file} has format_version {version!r}; this memgen ({__version__}) reads version "
            f"{FORMAT_VERSION}. Re-create the artifact with this version of memgen."
        )
    if manifest.get("kind") == "baseline":
        sections, needed = ("reasoner", "lora", "tensors", "prompt"), list(BASELINE_FILES)
    else:
        sections = ("reasoner", "weaver_backbone", "memory", "tensors", "trigger")
        needed = list(WEAVER_FILES)
    for key in sections:
        if not isinstance(manifest.get(key), dict):
            raise MemgenError(f'{file} is missing the "{key}" section; the manifest is damaged.')
    if manifest["kind"] != "baseline" and manifest["trigger"].get("trained"):
        needed.append(TRIGGER_FILE)
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise MemgenError(f"Artifact {path} is incomplete: missing {', '.join(missing)}.")
    return manifest


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise MemgenError(
            f"{file} is not a readable safetensors file ({exc}); it may be truncated. "
            "Re-create the artifact."
        ) from exc


def _check_shapes(file: Path, tensors: dict, expected: dict) -> None:
    got = {k: list(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = _shape_diff(got, expected)
        raise MemgenError(f"{file} does not match its manifest: {'; '.join(diff)}.")


def _shape_diff(got: dict, expected: dict) -> list[str]:
    out = [f"{k} missing" for k in expected if k not in got]
    out += [f"{k} unexpected" for k in got if k not in expected]
    out += [
        f"{k} has shape {got[k]}, manifest says {expected[k]}"
        for k in got
        if k in expected and got[k] != expected[k]
    ]
    return out


def check_base(manifest: dict, base: LoadedBase, allow_mismatch: bool) -> None:
    want = manifest["reasoner"]
    if want.get("fingerprint") == base.fingerprint or allow_mismatch:
        return
    raise MemgenError(
        f'This artifact was trained on base "{want.get("name")}" (fingerprint '
        f'{str(want.get("fingerprint"))[:12]}); you passed "{base.name}" (fingerprint '
        f"{base.fingerprint[:12]}). Pass --base {want.get('name')}, or --allow-base-mismatch if "
        "you know the two share architecture and tokenizer."
    )


def load_artifact(
    path: str | Path,
    base: LoadedBase | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_base_mismatch: bool = False,
    weaver_base: LoadedBase | None = None,
) -> tuple[MemGenModel, dict, LoadedBase]:
    """Rebuild the MemGen model an artifact describes; returns (model, manifest, base)."""
    path = Path(path)
    manifest = read_manifest(path)
    require_kind(manifest, path, "weaver")
    if base is None:
        base = load_base(manifest["reasoner"]["name"], device=device, dtype=dtype)
    check_base(manifest, base, allow_base_mismatch)
    backbone = None
    if not manifest["weaver_backbone"].get("shared", True):
        if weaver_base is None:
            weaver_base = load_base(manifest["weaver_backbone"]["name"], device=device, dtype=dtype)
        backbone = weaver_base.model
    cfg = from_dict(MemoryConfig, manifest["memory"], "memory")
    model = MemGenModel(base.model, base.tokenizer, cfg, weaver_backbone=backbone)
    weaver = _load_tensors(path / "weaver.safetensors")
    _check_shapes(path / "weaver.safetensors", weaver, manifest["tensors"]["weaver"])
    model.weaver.load_state_dict(weaver)
    adapter = _load_tensors(path / "weaver" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model.peft, adapter, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ADAPTER in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise MemgenError(
            f"{path / 'weaver'} does not fit the weaver backbone "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors)."
        )
    if manifest["trigger"].get("trained"):
        trig = _load_tensors(path / TRIGGER_FILE)
        _check_shapes(path / TRIGGER_FILE, trig, manifest["tensors"]["trigger"])
        model.trigger.load_state_dict(trig)
    model.to(base.model.device).eval()
    return model, manifest, base


# ------------------------------------------------------------------------------- baseline
def require_kind(manifest: dict, path: str | Path, wanted: str) -> None:
    """Refuse a baseline where a weaver is needed (``wanted="weaver"``) and the other way round."""
    kind = manifest.get("kind", "weaver")
    if wanted == "weaver" and kind == "baseline":
        raise MemgenError(
            f"{path} is a LoRA baseline (kind baseline, from `memgen baseline`), not a weaver: it "
            "has no memory to weave. `memgen eval --artifact` evaluates it as the adapted "
            "reasoner; this command needs a weaver artifact from `memgen sft-weaver`."
        )
    if wanted == "baseline" and kind != "baseline":
        raise MemgenError(
            f"{path} is a {kind} artifact (a trained weaver), not a LoRA baseline: this needs an "
            "artifact from `memgen baseline sft`. Use the weaver with eval, generate or "
            "inspect-memory."
        )


def save_baseline(
    model: PeftModel,
    base: LoadedBase,
    out: str | Path,
    *,
    lora: dict,
    budget: dict,
    prompt: dict | None = None,
    recipe_yaml: str | None = None,
    training: dict | None = None,
    metrics_file: str | Path | None = None,
    parent: str | Path | None = None,
) -> Path:
    """Write a baseline artifact (a PEFT adapter directory + manifest) atomically; ``parent``:
    the baseline it was trained from (``baseline grpo``'s init), by name and digest."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card template, not ours
        adapter = load_file(tmp / "adapter_model.safetensors")
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "baseline",
            "memgen_version": __version__,
            "versions": environment_versions(),
            "reasoner": {"name": base.name, "source": base.source, "fingerprint": base.fingerprint},
            "lora": lora,
            "budget": budget,
            "prompt": {"chat_template": base.tokenizer.chat_template, **(prompt or {})},
            "tensors": {"adapter": {k: list(v.shape) for k, v in adapter.items()}},
            "parent": _parent(parent),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "training": training or {},
        }
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        if metrics_file is not None and Path(metrics_file).exists():
            shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_baseline(
    path: str | Path,
    base: LoadedBase | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_base_mismatch: bool = False,
    trainable: bool = False,
) -> tuple[PeftModel, dict, LoadedBase]:
    """The reasoner with a baseline's adapter, validated; returns (model, manifest, base).
    ``trainable``: the adapter's tensors require grad (to train it further), else eval mode."""
    path = Path(path)
    manifest = read_manifest(path)
    require_kind(manifest, path, "baseline")
    if base is None:
        base = load_base(manifest["reasoner"]["name"], device=device, dtype=dtype)
    check_base(manifest, base, allow_base_mismatch)
    file = path / "adapter_model.safetensors"
    _check_shapes(file, _load_tensors(file), manifest["tensors"].get("adapter", {}))
    try:
        model = PeftModel.from_pretrained(base.model, str(path), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MemgenError(f"{path} does not fit base {base.name}: {exc}") from exc
    return (model if trainable else model.eval()), manifest, base
