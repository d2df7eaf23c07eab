"""What a reasoner's architecture allows of the memory settings, and its cache's shape.

Checked when a ``MemGenModel`` is built, before any weight is touched, so that a setting the
model cannot honour stops with one message that says what to use instead.
"""

from __future__ import annotations

from torch import nn

from memgen_cli.config import MemoryConfig
from memgen_cli.errors import MemgenError
from memgen_cli.models.kv import reusable
from memgen_cli.models.weaver import INJECTS


def check_inject(cfg: MemoryConfig, config, separate_weaver: bool) -> None:
    """Refuse memory settings the model cannot honour, saying what to use instead."""
    if cfg.inject not in INJECTS:
        raise MemgenError(f'memory.inject must be input or kv, not "{cfg.inject}".')
    if cfg.weaver_reads == "cache":
        if separate_weaver:
            raise MemgenError(
                "memory.weaver_reads: cache has the weaver read the reasoner's own cached keys "
                "and values, so the weaver must be the reasoner's own backbone; "
                "model.weaver_base sets a separate one. Drop model.weaver_base, or use "
                "memory.weaver_reads: context with it."
            )
        if not reusable(config):
            raise MemgenError(
                f"memory.weaver_reads: cache is not supported on models with sliding-window "
                f"attention (this one has sliding_window {config.sliding_window}). Use "
                "memory.weaver_reads: context."
            )
    if cfg.inject != "kv":
        return
    if separate_weaver:
        raise MemgenError(
            "memory.inject: kv writes the weaver's keys and values into the reasoner's cache, so "
            "the weaver must be the reasoner's own backbone; model.weaver_base sets a separate "
            "one. Drop model.weaver_base, or use memory.inject: input with it."
        )
    if not reusable(config):
        raise MemgenError(
            f"memory.inject: kv is not supported on models with sliding-window attention "
            f"(this one has sliding_window {config.sliding_window}): memory written into the "
            "cache would age out of the window like any old token. Use memory.inject: input."
        )


def check_lora_targets(targets: list[str], model) -> None:
    """Refuse LoRA target names that match no linear layer of ``model`` (PEFT's suffix match):
    PEFT raises only when none match, and says nothing of a misspelt one among others."""
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise MemgenError(
            f"memory.lora_targets {missing} match no linear layer of "
            f"{type(model).__name__}; its linear layers are named {', '.join(sorted(names))}. "
            "Name some of those, e.g. --set memory.lora_targets=[q_proj,v_proj]."
        )


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of ``config``'s KV cache."""
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, dim
