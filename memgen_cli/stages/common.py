"""What several stages need: the model for (base, artifact), prompt formats, trace summaries.

Building blocks only; no stage imports another stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from memgen_cli.artifacts import load_artifact
from memgen_cli.config import MemoryConfig
from memgen_cli.errors import MemgenError
from memgen_cli.generation import Insertion
from memgen_cli.models.base import DEFAULT_BASE, LoadedBase, load_base
from memgen_cli.models.memgen import MemGenModel

DEFAULT_SUFFIX = "Put your final answer within \\boxed{}."


@dataclass
class Session:
    """A ready model: the composition, where it came from, and the artifact's manifest."""

    model: MemGenModel
    base: LoadedBase
    manifest: dict | None

    @property
    def has_memory(self) -> bool:
        return self.manifest is not None

    @property
    def has_trigger(self) -> bool:
        return bool(self.manifest and self.manifest["trigger"].get("trained"))


def open_session(
    base: str | None,
    artifact: Path | None,
    device: str = "auto",
    dtype: str = "auto",
    allow_base_mismatch: bool = False,
) -> Session:
    """Load a base (and an artifact onto it). Without an artifact, memory can only be off."""
    if artifact is not None:
        loaded = load_base(base, device, dtype) if base else None
        model, manifest, loaded = load_artifact(
            artifact, loaded, device=device, dtype=dtype, allow_base_mismatch=allow_base_mismatch
        )
        return Session(model, loaded, manifest)
    loaded = load_base(base or DEFAULT_BASE, device, dtype)
    return Session(MemGenModel(loaded.model, loaded.tokenizer, MemoryConfig()).eval(), loaded, None)


def check_memory(memory: str) -> str:
    """A known memory mode, checked before any model is loaded."""
    if memory not in ("off", "weaver", "full"):
        raise MemgenError(f'--memory must be off, weaver or full; got "{memory}".')
    return memory


def resolve_memory(session: Session, memory: str, console: Console | None = None) -> str:
    """Check a memory mode against what the session can do; say plainly when memory is off."""
    check_memory(memory)
    if memory != "off" and not session.has_memory:
        if console is not None:
            console.print("[yellow]No --artifact given: memory is off (plain reasoner).[/]")
        return "off"
    if memory == "full" and not session.has_trigger:
        raise MemgenError(
            "--memory full needs a trained trigger, and this artifact has none. "
            "Use --memory weaver (insert at every clause boundary), or train one with "
            "`memgen train-trigger`."
        )
    return memory


def resolve_suffix(session: Session, override: str | None, console: Console | None = None) -> str:
    """The answer-format suffix: the artifact's unless overridden (warn when they differ)."""
    recorded = (session.manifest or {}).get("prompt", {}).get("prompt_suffix")
    if override is None:
        return DEFAULT_SUFFIX if recorded is None else recorded
    if recorded is not None and override != recorded and console is not None:
        console.print(
            f"[yellow]warning:[/] --prompt-suffix differs from the artifact's training format "
            f"({recorded!r}); results may suffer."
        )
    return override


def user_message(question: str, suffix: str) -> dict:
    return {"role": "user", "content": f"{question}\n{suffix}" if suffix else question}


def insertion_record(ins: Insertion) -> dict:
    """JSON-ready summary of one insertion (norms instead of the full vectors). With
    ``memory.inject: kv`` the memory is keys and values, not input vectors: no latent norms."""
    norms = torch.linalg.vector_norm(ins.latents, dim=-1) if ins.latents.shape[-1] else None
    return {
        **ins.summary(),
        "latent_norms": None if norms is None else [round(float(n), 4) for n in norms],
    }
