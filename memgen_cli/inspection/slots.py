"""Probes of one answer of a ``memory.inject: kv`` weaver: its memory slots, the attention they
get at every layer, and what they do.

With kv the memory is not a vector in the input space: at each insertion the weaver's keys and
values at K slot positions, at every layer, are written into the reasoner's cache, and the
reasoner never runs over those positions (models/memgen.py). The trace keeps the weaver's final
hidden states at the slots but not the keys and values (11,520 numbers a slot on SmolLM2), so
they are recomputed here as the training forward computes them (``training._weave_hidden_kv``):
one weaver pass over the answer with the query latents at the slot columns, then one reasoner
pass whose cache (``kv.slot_cache``) takes the weaver's keys and values at those columns.
tests/test_inspect.py checks that this reproduces the generator's own log-probabilities and
the recorded weaver states within 1e-4.

The answer's layout is ``probe.Stream``'s (tokens, then each insertion's K slot columns after
the token it followed), built with the query latents where input-mode latents would go.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from memgen_cli.generation import Insertion
from memgen_cli.inspection.probe import (
    Stream,
    attention_mass,
    build_stream,
    eager_attention,
    head_mean_attention,
    over_stream,
)
from memgen_cli.models.kv import slot_cache
from memgen_cli.models.memgen import MemGenModel


@dataclass
class SlotMemory:
    """One answer with the weaver's keys and values at every column, ready for the reasoner."""

    stream: Stream  # the weaver's input: token embeddings, query latents at the slot columns
    keys: list[torch.Tensor]  # per layer (1, kv_heads, S, head_dim), the weaver's
    values: list[torch.Tensor]
    states: torch.Tensor  # (S, D) the weaver's last hidden states (final norm applied)
    slots: torch.Tensor  # (1, S) bool, True at every insertion's slot columns


def slot_stream(
    model: MemGenModel, prompt_ids: list[int], tokens: list[int], eos: int | None, insertions
) -> Stream:
    """The stream of ``prompt_ids`` + ``tokens`` (+ ``eos``) with each insertion's query latents
    at its K slot columns: what the weaver read while generating."""
    queries = [
        dataclasses.replace(ins, latents=model.weaver.query_embeds(ins.kind, 1)[0].detach())
        for ins in insertions
    ]
    return build_stream(model, prompt_ids, tokens, eos, queries)


@torch.no_grad()
def weave(model: MemGenModel, stream: Stream) -> SlotMemory:
    """The weaver (adapter on) over the whole stream: its keys and values at every column."""
    slots = torch.zeros(stream.embeds.shape[:2], dtype=torch.bool, device=stream.embeds.device)
    for i in range(len(stream.insertions)):
        chunk = stream.chunk(i)
        slots[0, chunk.start : chunk.stop] = True
    cache = DynamicCache(config=model.weaver_lm.config)
    if model.reads_cache:
        states = _over_stream_on_cache(model, stream, cache)
    else:
        with model.weaver_adapter():
            out = over_stream(
                model.weaver_lm.get_decoder(), stream, past_key_values=cache, use_cache=True
            )
        states = out.last_hidden_state[0].float()
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    if model.weaver.prefix_keys is not None and not model.reads_cache:  # already added there
        index = torch.full_like(slots, -1, dtype=torch.long)
        for i, ins in enumerate(stream.insertions):
            chunk = stream.chunk(i)
            index[0, chunk.start : chunk.stop] = model.weaver.prefix_rows(ins.kind, len(chunk))
        _, positions = stream.mask_and_positions()
        keys, values = model.add_prefix(keys, values, index, positions.to(index.device))
    return SlotMemory(stream, keys, values, states, slots)


def _over_stream_on_cache(model: MemGenModel, stream: Stream, cache) -> torch.Tensor:
    """``memory.weaver_reads: cache``, as generation weaves: the reasoner over each run of
    tokens into ``cache``, and at each insertion the query latents read it
    (``MemGenModel.weave_on_cache``) and their keys and values, prefix added, are appended;
    the last hidden states of every column (S, D): the weaver's at the slots."""
    mask, positions = stream.mask_and_positions()
    states, at = [], 0
    for i, ins in enumerate(stream.insertions):
        chunk = stream.chunk(i)
        if chunk.start > at:
            states.append(_tokens(model, stream, at, chunk.start, cache))
        memory, hidden = model.weave_on_cache(
            ins.kind, cache, mask[:, : chunk.start], positions[:, chunk.start]
        )
        for layer, (keys, values) in enumerate(zip(memory.keys, memory.values, strict=True)):
            cache.update(keys, values, layer)
        states.append(hidden[0])
        at = chunk.stop
    if stream.embeds.shape[1] > at:
        states.append(_tokens(model, stream, at, stream.embeds.shape[1], cache))
    return torch.cat(states)


def _tokens(model: MemGenModel, stream: Stream, a: int, b: int, cache) -> torch.Tensor:
    """The reasoner over the stream's columns [a, b) into ``cache``: (b - a, D)."""
    mask, positions = stream.mask_and_positions()
    return model.reasoner_hidden(stream.embeds[:, a:b], mask[:, :b], positions[:, a:b], cache)[0]


@dataclass
class Reading:
    hidden: torch.Tensor  # (S, D) the reasoner's last hidden states (final norm applied)
    attention: torch.Tensor | None  # (layers, S, S) weights averaged over heads, if asked
    cache: DynamicCache  # the reasoner's keys and values, the weaver's at the slot columns


@torch.no_grad()
def read(
    model: MemGenModel,
    memory: SlotMemory,
    drop: int | None = None,
    zero_values: int | None = None,
    attention: bool = False,
) -> Reading:
    """The reasoner (adapters off) over the answer with the memory in its cache.

    ``drop=i``: insertion i's slot columns are masked out (every other memory as computed,
    every position unchanged, so every other slot's rotated keys stay valid). ``zero_values=i``:
    its slots' values are zero at every layer (their keys still take softmax mass).
    ``attention``: also return the weights (the caller provides eager attention).
    """
    stream = memory.stream
    mask, _ = stream.mask_and_positions()
    values = memory.values
    if drop is not None:
        chunk = stream.chunk(drop)
        mask[0, chunk.start : chunk.stop] = 0
    if zero_values is not None:
        chunk = stream.chunk(zero_values)
        values = [v.clone() for v in values]
        for v in values:
            v[:, :, chunk.start : chunk.stop] = 0
    # The placeholders' own outputs are never read; zeros keep them from looking like inputs.
    embeds = torch.where(memory.slots[..., None], 0.0, stream.embeds)
    cache = slot_cache(model.reasoner.config, memory.keys, values, memory.slots)
    model._set_adapter(False)  # the reasoner, never the weaver
    out = over_stream(
        model.reasoner.get_decoder(),
        stream,
        mask,
        embeds,
        past_key_values=cache,
        use_cache=True,
        output_attentions=attention,
    )
    weights = head_mean_attention(out) if attention else None
    return Reading(out.last_hidden_state[0], weights, cache)


@torch.no_grad()
def continuation_logprobs(model: MemGenModel, memory: SlotMemory, **ablate) -> torch.Tensor:
    """Teacher-forced log-probability of every continuation token (EOS included): (n,).

    Each token is predicted at the previous token's own column: the reasoner never runs over
    the slots, so the token right after an insertion is predicted from the boundary token.
    ``ablate``: ``drop`` or ``zero_values`` (see ``read``).
    """
    stream = memory.stream
    hidden = read(model, memory, **ablate).hidden
    rows = stream.token_pos[stream.prompt_len - 1 : len(stream.ids) - 1].to(hidden.device)
    logp = torch.log_softmax(model.lm_head(hidden[rows]), dim=-1)
    target = torch.tensor(stream.ids[stream.prompt_len :], device=logp.device)
    return logp.gather(-1, target[:, None])[:, 0]


def probe_slots(model: MemGenModel, memory: SlotMemory) -> tuple[str, list[dict]]:
    """One eager reasoner pass with the memory; per insertion, its ``attention`` (per layer)
    and ``slot_norms``. Returns (the attention implementation used, one dict of record fields
    per insertion)."""
    with eager_attention(model) as implementation:
        reading = read(model, memory, attention=True)
    stream = memory.stream
    return implementation, [
        {
            "attention": attention_mass(reading.attention, stream, i),
            "slot_norms": slot_norms(reading, stream, i),
        }
        for i in range(len(stream.insertions))
    ]


def slot_norms(reading: Reading, stream: Stream, index: int) -> dict:
    """Per layer: mean L2 norm of insertion ``index``'s slot keys (and values), over its K slots
    and the KV heads, divided by the same mean over every token column, prompt and answer (the
    reasoner's own keys and values). Rotary embeddings keep norms, so keys compare across
    positions. A ratio far above 1 is the risk to watch with kv (key-norm drift): slot keys that
    grow to pull attention onto the slots.
    """
    chunk = stream.chunk(index)
    tokens = stream.token_pos.to(reading.hidden.device)

    def ratios(tensors) -> list[float]:
        out = []
        for t in tensors:
            norms = torch.linalg.vector_norm(t[0].float(), dim=-1)  # (kv_heads, S)
            slot = norms[:, chunk.start : chunk.stop].mean()
            out.append(round(float(slot / norms[:, tokens].mean().clamp_min(1e-12)), 4))
        return out

    layers = reading.cache.layers
    return {
        "key_ratio": ratios([layer.keys for layer in layers]),
        "value_ratio": ratios([layer.values for layer in layers]),
    }


def memory_vectors(ins: Insertion, kv: bool) -> torch.Tensor:
    """What nearest tokens, clusters and the drop rule read of an insertion: (K, D). Input: its
    latents; kv: the weaver's final states at its slots (its latents are (K, 0))."""
    return ins.weaver_states if kv else ins.latents
