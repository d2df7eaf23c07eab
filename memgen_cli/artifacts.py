"""Self-describing artifacts: save and load a weaver (and trigger), or a baseline (LoRA, prompt
or prefix tuning of the reasoner), as safetensors + manifest.

Weaver layout (kind ``weaver``, or ``memgen`` once a trigger is trained; a directory, written
atomically: temporary directory, then swapped in by ``atomic.swap_in``)::

    memgen.json                      manifest (format, base fingerprint, settings, lineage)
    weaver/adapter_config.json       PEFT adapter, loadable with PeftModel.from_pretrained
    weaver/adapter_model.safetensors
    weaver.safetensors               query latents, norms, scales, projections
    trigger.safetensors              only when a trigger has been trained
    recipe.yaml                      the resolved configuration that produced it
    metrics.jsonl                    the training log, when there is one

Baseline layout (kind ``baseline``, from ``memgen baseline``: a PEFT adapter on the reasoner
itself, no memory; the directory *is* a PEFT adapter, ``PeftModel.from_pretrained(base, DIR)``).
Its ``method`` is lora (a LoRA, settings in ``lora``; also every baseline that records no
method), prompt or prefix (PEFT prompt or prefix tuning, settings in ``prompt_learning``)::

    memgen.json                      manifest (format, base fingerprint, method, its settings, budget)
    adapter_config.json
    adapter_model.safetensors
    recipe.yaml, metrics.jsonl       as above

Each kind is refused, with a message saying which command makes the right one, where the
other is required. Writing never destroys what memgen did not write (``outputs.check_output``,
which also names the files above). Nothing is pickled. Loading validates the manifest, the file set, every tensor's shape and the
base model's fingerprint, and says precisely what differs and what to do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memgen_cli import __version__
from memgen_cli.config import MemoryConfig, from_dict, to_dict
from memgen_cli.errors import MemgenError
from memgen_cli.generation.prompt_learning import method_of
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.models.memgen import ADAPTER, MemGenModel
from memgen_cli.outputs import (
    BASELINE_FILES,
    MANIFEST,
    RETRIEVAL_FILES,
    TRIGGER_FILE,
    WEAVER_FILES,
    atomic_dir,
)
from memgen_cli.outputs import check_output as check_output  # re-exported: stages import it here
from memgen_cli.versions import environment_versions

FORMAT_VERSION = 1
# A baseline's method -> the manifest (and recipe) section of its settings, and its name.
BASELINE_SECTIONS = {"lora": "lora", "prompt": "prompt_learning", "prefix": "prompt_learning"}
BASELINE_NAMES = {"lora": "LoRA", "prompt": "prompt tuning", "prefix": "prefix tuning"}


def artifact_digest(path: str | Path) -> str:
    """sha256 over the artifact's tensors and manifest (its identity as a parent)."""
    path = Path(path)
    h = hashlib.sha256()
    retrieval = dict.fromkeys(name for files in RETRIEVAL_FILES.values() for name in files)
    for name in (MANIFEST, *WEAVER_FILES, TRIGGER_FILE, *BASELINE_FILES, *retrieval):
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
    manifest = _manifest(
        "memgen" if model.trigger.is_trained else "weaver",
        base,
        parent,
        training,
        weaver_backbone={
            "shared": model.shared,
            "name": base.name if model.shared else weaver_base.name,
            "fingerprint": base.fingerprint if model.shared else weaver_base.fingerprint,
        },
        memory=to_dict(model.cfg),
        prompt={"chat_template": model.tokenizer.chat_template, **(prompt or {})},
        trigger={"trained": model.trigger.is_trained},
        tensors={
            "weaver": {k: list(v.shape) for k, v in model.weaver.state_dict().items()},
            "trigger": {k: list(v.shape) for k, v in model.trigger.state_dict().items()},
        },
    )
    with atomic_dir(out) as tmp:
        scratch = tmp / ".peft"
        model.peft.save_pretrained(scratch, selected_adapters=[ADAPTER])
        os.replace(scratch / ADAPTER, tmp / "weaver")
        shutil.rmtree(scratch)
        save_file(_contiguous(model.weaver.state_dict()), tmp / "weaver.safetensors")
        if model.trigger.is_trained:
            save_file(_contiguous(model.trigger.state_dict()), tmp / TRIGGER_FILE)
        _write_record(tmp, manifest, recipe_yaml, metrics_file)
    return out


def _manifest(kind: str, base: LoadedBase, parent, training: dict | None, **sections) -> dict:
    """``memgen.json``: what every kind records, around the ``sections`` of its own kind."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "memgen_version": __version__,
        "versions": environment_versions(),  # python and the libraries that made it
        "reasoner": {"name": base.name, "source": base.source, "fingerprint": base.fingerprint},
        **sections,
        "parent": _parent(parent),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training": training or {},
    }


def _write_record(tmp: Path, manifest: dict, recipe_yaml: str | None, metrics_file) -> None:
    """Beside the tensors: the recipe that made them, the training log, and the manifest."""
    if recipe_yaml is not None:
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    if metrics_file is not None and Path(metrics_file).exists():
        shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


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
        method = manifest.setdefault("method", "lora")  # baselines before prompt and prefix
        if method not in BASELINE_SECTIONS:
            raise MemgenError(
                f'{file} is a baseline of method "{method}", which this memgen ({__version__}) '
                f"does not know (it reads {', '.join(BASELINE_SECTIONS)}). Use the memgen that "
                "made it, or re-create the artifact."
            )
        sections = ("reasoner", BASELINE_SECTIONS[method], "tensors", "prompt")
        needed = list(BASELINE_FILES)
    elif manifest.get("kind") == "retrieval":  # memgen baseline retrieval: retrieval/artifact.py
        sections = ("reasoner", "retrieval", "prompt")
        similarity = (manifest.get("retrieval") or {}).get("similarity")
        if similarity not in RETRIEVAL_FILES:
            raise MemgenError(
                f'{file} is a retrieval artifact of similarity "{similarity}", which this memgen '
                f"({__version__}) does not know (it reads {', '.join(RETRIEVAL_FILES)}). "
                "Re-create it with `memgen baseline retrieval`."
            )
        needed = list(RETRIEVAL_FILES[similarity])
    else:
        sections = ("reasoner", "weaver_backbone", "memory", "tensors", "trigger")
        needed = list(WEAVER_FILES)
    for key in sections:
        if not isinstance(manifest.get(key), dict):
            raise MemgenError(f'{file} is missing the "{key}" section; the manifest is damaged.')
    if manifest["kind"] not in ("baseline", "retrieval") and manifest["trigger"].get("trained"):
        needed.append(TRIGGER_FILE)
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise MemgenError(
            f"Artifact {path} is incomplete: missing {', '.join(missing)}. Copy the whole folder "
            "again if it was copied in part, or re-create the artifact."
        )
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


def _open(
    path: Path, wanted: str, base: LoadedBase | None, device, dtype, allow_base_mismatch: bool
) -> tuple[dict, LoadedBase]:
    """The manifest of an artifact of kind ``wanted``, and the base it goes on (the recorded
    one unless given), checked against each other before any tensor is read."""
    manifest = read_manifest(path)
    require_kind(manifest, path, wanted)
    if base is None:
        base = load_base(manifest["reasoner"]["name"], device=device, dtype=dtype)
    check_base(manifest, base, allow_base_mismatch)
    return manifest, base


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
    manifest, base = _open(path, "weaver", base, device, dtype, allow_base_mismatch)
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
    """Refuse a baseline where a weaver is needed (``wanted="weaver"``) and the other way round,
    and a retrieval artifact anywhere but where one is asked for (``wanted="retrieval"``)."""
    kind = manifest.get("kind", "weaver")
    if kind == "retrieval" and wanted != "retrieval":
        needs = {"weaver": "a weaver artifact from `memgen sft-weaver`"}.get(
            wanted, "a LoRA baseline from `memgen baseline sft`"
        )
        raise MemgenError(
            f"{path} is a retrieval artifact (kind retrieval, from `memgen baseline retrieval`), "
            f"not {'a weaver' if wanted == 'weaver' else 'a LoRA baseline'}: it holds solved "
            "problems, no weights to train and no memory to weave. `memgen eval --artifact` and "
            "`memgen generate --artifact` answer with its examples in the prompt (beside a "
            f"weaver: `--retrieval`); this command needs {needs}."
        )
    if wanted == "retrieval" and kind != "retrieval":
        raise MemgenError(
            f"{path} is a {kind} artifact, not a retrieval artifact: --retrieval takes a store "
            "made by `memgen baseline retrieval`. Give the weaver with --artifact."
        )
    if wanted == "weaver" and kind == "baseline":
        name = BASELINE_NAMES.get(manifest.get("method", "lora"), "PEFT")
        raise MemgenError(
            f"{path} is a {name} baseline (kind baseline, from `memgen baseline`), not a weaver: it "
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
    budget: dict,
    lora: dict | None = None,
    prompt_learning: dict | None = None,
    prompt: dict | None = None,
    recipe_yaml: str | None = None,
    training: dict | None = None,
    metrics_file: str | Path | None = None,
    parent: str | Path | None = None,
) -> Path:
    """Write a baseline artifact (a PEFT adapter directory + manifest) atomically. Its method
    is the adapter's (LoRA, prompt or prefix tuning), with its settings: ``lora`` or
    ``prompt_learning``. ``parent``: the baseline it was trained from (``baseline grpo``'s
    init), by name and digest."""
    out = Path(out)
    method = method_of(model)
    settings = lora if method == "lora" else prompt_learning
    if settings is None:
        raise ValueError(f"a {method} baseline needs its {BASELINE_SECTIONS[method]} settings")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card template, not ours
        adapter = load_file(tmp / "adapter_model.safetensors")
        manifest = _manifest(
            "baseline",
            base,
            parent,
            training,
            method=method,
            **{BASELINE_SECTIONS[method]: settings},
            budget=budget,
            prompt={"chat_template": base.tokenizer.chat_template, **(prompt or {})},
            tensors={"adapter": {k: list(v.shape) for k, v in adapter.items()}},
        )
        _write_record(tmp, manifest, recipe_yaml, metrics_file)
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
    """The reasoner with a baseline's adapter (LoRA, prompt or prefix tuning), validated;
    returns (model, manifest, base). ``trainable``: the adapter's tensors require grad (to
    train it further), else eval mode."""
    path = Path(path)
    manifest, base = _open(path, "baseline", base, device, dtype, allow_base_mismatch)
    file = path / "adapter_model.safetensors"
    _check_shapes(file, _load_tensors(file), manifest["tensors"].get("adapter", {}))
    try:
        model = PeftModel.from_pretrained(base.model, str(path), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MemgenError(f"{path} does not fit base {base.name}: {exc}") from exc
    return (model if trainable else model.eval()), manifest, base
