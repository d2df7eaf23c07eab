"""The training forward: the frozen reasoner's loss with woven latents, batched and cached.

Given a batch of token ids (prompt + target), the insertion points (token indices after which
latents go: one prompt point per row, then inference points at delimiters of the target), it
returns the reasoner's next-token loss on the labelled tokens, with logits aligned with the
original tokens (``logits[:, i]`` predicts token ``i + 1``, exactly as for the plain model).

Fast path (``weave_forward``): all rows at once. The weaver reads each row's context in rounds,
one round per insertion, keeping its KV cache between rounds (gradients flow through the cache)
instead of re-reading the growing prefix; rows whose chunk is shorter get masked slots. The
reasoner then runs once over the whole stream with every chunk of latents in place.

With ``memory.inject: kv`` (``_weave_hidden_kv``) the batch is one stream with K placeholder
columns at each insertion point, at the positions the memory takes. The weaver needs nothing
the reasoner computes (it reads token embeddings and its own earlier slots), so it runs *once*
over the stream, query latents at the placeholders, into a plain DynamicCache: its keys and
values at every column and layer, on the autograd graph. The reasoner then runs once over the
same columns (placeholders zeroed) with a cache whose layers (``kv.SlotLayer``) replace the
keys and values the reasoner computes at the placeholder columns by the weaver's, with
``torch.where`` as each layer writes them, before attention reads them: no in-place write, so
the loss of every later token reaches the weaver through attention at every layer. Position
ids are passed explicitly and are one tensor for both passes, so every slot sits at the
position its rotated key was computed at. The reasoner's outputs at the placeholders are never
read: ``hidden[:, i]`` is the state at token i's own column (the token after an insertion
point is predicted from the boundary token, which precedes the memory).

The slow reference path that tests hold this one to is ``training_reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from memgen_cli.models.kv import slot_cache
from memgen_cli.models.latents import (
    align_offsets,
    chunk_mask,
    latent_positions,
    positions_from_mask,
    prediction_positions,
    stream_layout,
)
from memgen_cli.models.memgen import MemGenModel

IGNORE = -100


@dataclass
class WeaveOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None  # (B, T, V) aligned with the original tokens, if asked for
    num_tokens: int  # labelled tokens the loss averages over


@dataclass
class Points:
    """Insertion points of a batch: the prompt points (per row one index, or a list of them:
    an episode weaves prompt latents where each assistant turn begins; or None), then the
    inference points of each row. Every list is sorted."""

    prompt: list[int] | list[list[int]] | None
    inference: list[list[int]]

    def row(self, b: int) -> list[tuple[int, str]]:
        """Row ``b``'s points with their kind, in stream order."""
        prompt = [] if self.prompt is None else self.prompt[b]
        prompt = [prompt] if isinstance(prompt, int) else prompt
        marked = [(p, "prompt") for p in prompt] + [(p, "inference") for p in self.inference[b]]
        return sorted(marked)

    def rounds(self) -> list[tuple[str, list[int | None]]]:
        """Per weaver round, its kind and each row's point (None: the row has no point).

        A round weaves one kind (its query latents); each row takes its points in order, and a
        round's kind is the one most rows need next (a tie: prompt). One prompt point per row
        gives a prompt round, then one round per inference depth.

        >>> Points([[1, 9], [4]], [[5], []]).rounds()
        [('prompt', [1, 4]), ('inference', [5, None]), ('prompt', [9, None])]
        """
        queues = [self.row(b) for b in range(len(self.inference))]
        heads = [0] * len(queues)
        out: list[tuple[str, list[int | None]]] = []
        while True:
            nexts = [q[h][1] if h < len(q) else None for q, h in zip(queues, heads, strict=True)]
            if not any(nexts):
                return out
            kind = max(("prompt", "inference"), key=nexts.count)
            here = [
                q[h][0] if k == kind else None for q, h, k in zip(queues, heads, nexts, strict=True)
            ]
            heads = [h + (k == kind) for h, k in zip(heads, nexts, strict=True)]
            out.append((kind, here))

    def per_row(self, k_prompt: int, k_inference: int) -> tuple[list[list[int]], list[list[int]]]:
        """Sorted points of each row and the number of latents at each."""
        rows = [self.row(b) for b in range(len(self.inference))]
        pts = [[p for p, _ in row] for row in rows]
        ks = [[k_prompt if kind == "prompt" else k_inference for _, kind in row] for row in rows]
        return pts, ks


def select_points(candidates: list[int], schedule: str, cap: int, generator=None) -> list[int]:
    """Choose inference points among a target's delimiter positions.

    first: the first ``cap`` (the official code); random: a random subset of size ``cap`` (the
    paper); all: every delimiter; subsets: each of the first ``cap`` kept with probability 1/2
    (ours: the weaver then learns to work whatever subset a trained trigger invokes at).

    >>> select_points([3, 7, 9, 12], "first", 2)
    [3, 7]
    >>> select_points([3, 7, 9, 12], "all", 2)
    [3, 7, 9, 12]
    """
    if schedule == "first":
        return candidates[:cap]
    if schedule == "all":
        return list(candidates)
    if schedule == "random":
        if len(candidates) <= cap:
            return list(candidates)
        order = torch.randperm(len(candidates), generator=generator)[:cap]
        return sorted(candidates[i] for i in order.tolist())
    if schedule == "subsets":
        first = candidates[:cap]
        keep = torch.rand(len(first), generator=generator) < 0.5
        return [c for c, k in zip(first, keep.tolist(), strict=True) if k]
    raise ValueError(f"schedule must be first, random, all or subsets, not {schedule}")


def delimiter_positions(model: MemGenModel, ids: torch.Tensor, start: int, end: int) -> list[int]:
    """Indices i in [start, end - 1) whose token ends a clause (never after the last token)."""
    flags = model.delimiters[ids[start : end - 1].to(model.delimiters.device)]
    return (flags.nonzero().flatten() + start).tolist()


def hidden_loss(model: MemGenModel, hidden, labels, return_logits: bool) -> WeaveOutput:
    """Next-token CE over labelled tokens; ``hidden`` (B, T, D) is aligned with the tokens."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    count = int(keep.sum())
    if count == 0:
        loss = hidden.sum() * 0.0
    else:
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits, targets[keep], reduction="sum") / count
    logits = model.lm_head(hidden) if return_logits else None
    return WeaveOutput(loss, logits, count)


def weave_forward(
    model: MemGenModel, input_ids, attention_mask, labels, points: Points, return_logits=False
) -> WeaveOutput:
    """Batched training forward with the weaver's cache kept across insertion points."""
    hidden = weave_hidden(model, input_ids, attention_mask, points)
    return hidden_loss(model, hidden, labels, return_logits)


def weave_hidden(model: MemGenModel, input_ids, attention_mask, points: Points) -> torch.Tensor:
    """The reasoner's last hidden states over the woven stream, aligned with the tokens:
    ``hidden[:, i]`` predicts token ``i + 1`` (B, T, D). The loss and GRPO's log-probs read it."""
    if model.reads_cache:
        return _weave_hidden_on_cache(model, input_ids, attention_mask, points)
    if model.kv:
        return _weave_hidden_kv(model, input_ids, attention_mask, points)
    batch, length = input_ids.shape
    device = input_ids.device
    embeds = model.embed(input_ids)
    state = model.new_weaver_cache()
    consumed = torch.full((batch,), -1, device=device)  # last token index the weaver has read
    next_pos = torch.zeros(batch, dtype=torch.long, device=device)
    carry = None  # the previous round's latents, which the weaver reads as context next
    woven: list[torch.Tensor] = []
    for kind, row_points in points.rounds():
        has, target, lengths, index, valid, ctx, ctx_pos = _chunk(
            embeds, attention_mask, row_points, consumed, next_pos
        )
        if carry is not None:
            ctx = torch.cat([carry[0], ctx], 1)
            valid = torch.cat([carry[1], valid], 1)
            ctx_pos = torch.cat([carry[2], ctx_pos], 1)
        start = next_pos + lengths
        latents, _ = model.weave(kind, ctx, valid, ctx_pos, state, start)
        k = latents.shape[1]
        carry = (latents, chunk_mask(has, k), latent_positions(start, k))
        woven.append(latents)
        next_pos = start + has.long() * k
        consumed = torch.where(has, target, consumed)
    pts, ks, token_pos, starts, frozen = _layout(model, points, length)
    stream, stream_mask = _assemble(embeds, attention_mask, woven, points, token_pos, starts, ks)
    slots = None
    if model.weaver.prefix_keys is not None:  # memory.kv_prefix on the latents' columns
        slots = _slot_index(model, points, starts, ks, stream_mask.shape).to(device)
    hidden = _reasoner_pass(model, stream, stream_mask, frozen, slots=slots)
    # Padding tokens are not placed in the stream; their (ignored) predictions read its end.
    pred = prediction_positions(token_pos, pts, ks).clamp(max=stream.shape[1] - 1).to(device)
    return hidden.gather(1, pred[..., None].expand(-1, -1, hidden.shape[-1]))


def _chunk(embeds, attention_mask, row_points: list[int | None], consumed, next_pos):
    """One round's new context: each row's tokens after ``consumed`` up to its point (inclusive;
    None: none), right-padded to the longest with masked slots. Returns (has a point, the
    points (-1: none), lengths, token index (B, S), mask (B, S), embeddings, positions)."""
    device, length = embeds.device, embeds.shape[1]
    has = torch.tensor([p is not None for p in row_points], device=device)
    target = torch.tensor([p if p is not None else -1 for p in row_points], device=device)
    lengths = torch.where(has, target - consumed, 0)
    offsets = torch.arange(int(lengths.max()), device=device)[None]
    index = (consumed[:, None] + 1 + offsets).clamp(0, length - 1)
    valid = (offsets < lengths[:, None]).long() * attention_mask.gather(1, index)
    ctx = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    ctx_pos = next_pos[:, None] + valid.cumsum(1) - 1
    return has, target, lengths, index, valid, ctx, ctx_pos


def _weave_hidden_on_cache(model: MemGenModel, input_ids, attention_mask, points: Points):
    """``weave_hidden`` for ``memory.weaver_reads: cache``, with ``memory.inject: input``: the
    reasoner reads each row's stream in rounds, one per insertion, into one cache (rows' chunks
    right-padded with masked slots, positions explicit). A round's chunk and the K query
    latents after it run as *one* pass, the weaver's adapter on at the queries' columns only
    (``MemGenModel.adapter_at``): the queries read the chunk as the reasoner makes it, and are
    cropped from the cache afterwards; their last states become the latents that open the next
    round's chunk. A last round reads what is left. The first chunk depends on nothing the
    weaver does: it runs without autograd, its queries in a pass of their own. Each token's
    hidden state is gathered from the round that read it; the token at an insertion point is
    predicted from the last latent after it, as in the stream."""
    if model.kv:
        return _weave_hidden_kv_on_cache(model, input_ids, attention_mask, points)
    batch, length = input_ids.shape
    device = input_ids.device
    embeds = model.embed(input_ids)
    cache = DynamicCache(config=model.reasoner.config)
    mask = attention_mask[:, :0]
    consumed = torch.full((batch,), -1, device=device)
    next_pos = torch.zeros(batch, dtype=torch.long, device=device)
    where = torch.zeros(batch, length, dtype=torch.long, device=device)  # column per token
    rows = torch.arange(batch, device=device)
    carry, pieces, read = None, [], 0  # read: columns of hidden states so far
    rounds = [*points.rounds(), (None, [length - 1] * batch)]  # the last: the rest of each row
    for r, (kind, row_points) in enumerate(rounds):
        has, target, lengths, index, valid, ctx, ctx_pos = _chunk(
            embeds, attention_mask, row_points, consumed, next_pos
        )
        real = (torch.arange(index.shape[1], device=device)[None] < lengths[:, None]) & has[:, None]
        slots = torch.full_like(index, -1)
        if carry is not None:
            latents, carry_mask, carry_pos, carry_slots, carry_points = carry
            k = latents.shape[1]
            ctx = torch.cat([latents, ctx], 1)
            valid = torch.cat([carry_mask, valid], 1)
            ctx_pos = torch.cat([carry_pos, ctx_pos], 1)
            slots = torch.cat([carry_slots, slots], 1)
            woven = carry_mask[:, -1].bool()  # the point token is predicted after its latents
            where[rows[woven], carry_points[woven]] = read + k - 1
            index = torch.cat([index.new_zeros(batch, k), index], 1)
            real = torch.cat([real.new_zeros(batch, k), real], 1)
        cols = torch.arange(index.shape[1], device=device).expand_as(index)
        where[rows[:, None].expand_as(index)[real], index[real]] = read + cols[real]
        mask = torch.cat([mask, valid], 1)
        size = ctx.shape[1]
        read += size
        if kind is None or r == 0:
            with torch.set_grad_enabled(torch.is_grad_enabled() and r > 0):
                pieces.append(model.reasoner_hidden(ctx, mask, ctx_pos, cache, slots))
            if kind is None:
                break
        start = next_pos + lengths
        k = model.weaver.num_latents(kind)
        if r == 0:
            latents, _ = model.weave_on_cache(kind, cache, mask, start)
        else:  # the chunk and the queries in one pass
            queries = model.weaver.query_embeds(kind, batch).to(ctx.dtype)
            inputs = torch.cat([ctx, queries], 1)
            full = torch.cat([mask, mask.new_ones(batch, k)], 1)
            positions = torch.cat([ctx_pos, latent_positions(start, k)], 1)
            at = torch.cat([torch.zeros_like(valid), torch.ones_like(valid[:, :k])], 1).bool()
            slots = torch.cat([slots, slots.new_full((batch, k), -1)], 1)
            hidden = model.reasoner_hidden(inputs, full, positions, cache, slots, adapter=at)
            cache.crop(-k)
            pieces.append(hidden[:, :size])
            states = hidden[:, size:].float()
            latents = model.weaver.weaver_to_reasoner(states).to(model.dtype)
        prefix = model.weaver.prefix_rows(kind, k).to(device)
        carry_slots = torch.where(has[:, None], prefix[None], -1)
        carry = (latents, chunk_mask(has, k), latent_positions(start, k), carry_slots, target)
        next_pos = start + has.long() * k
        consumed = torch.where(has, target, consumed)
    hidden = torch.cat(pieces, 1)
    return hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))


def _weave_hidden_kv_on_cache(model: MemGenModel, input_ids, attention_mask, points: Points):
    """``memory.weaver_reads: cache`` with ``memory.inject: kv``: the stream with the query
    latents at their slots runs through the reasoner *once*, the weaver's adapter on at the
    slot columns only (``MemGenModel.adapter_at``) and the kv prefix added there as the keys and
    values are made: each slot reads the context as the reasoner makes it, and every later
    token reads the slots' keys and values, at every layer, through attention (gradients too).
    That is what generation does weave by weave. Tokens are predicted from their own columns
    (the token after a point from the boundary token, which precedes the memory)."""
    stream, mask, index, token_pos, frozen = _query_stream(model, input_ids, attention_mask, points)
    hidden = _reasoner_pass(model, stream, mask, frozen, slots=index, adapter=index >= 0)
    return _at_tokens(hidden, token_pos)


def _query_stream(model: MemGenModel, input_ids, attention_mask, points: Points):
    """The kv stream: token embeddings with each round's query latents at its slot columns.
    Returns (stream, its mask, each column's kv-prefix row (-1 off the slots), each token's
    column, how many leading columns come before any slot)."""
    batch, length = input_ids.shape
    embeds = model.embed(input_ids)
    _, ks, token_pos, starts, frozen = _layout(model, points, length)
    queries = [
        model.weaver.query_embeds(kind, batch).to(embeds.dtype) for kind, _ in points.rounds()
    ]
    stream, mask = _assemble(embeds, attention_mask, queries, points, token_pos, starts, ks)
    index = _slot_index(model, points, starts, ks, mask.shape).to(stream.device)
    return stream, mask, index, token_pos, frozen


def _at_tokens(hidden: torch.Tensor, token_pos: torch.Tensor) -> torch.Tensor:
    """``hidden`` (B, S, D) at each token's own column (padding reads the stream's end)."""
    pred = token_pos.clamp(max=hidden.shape[1] - 1).to(hidden.device)
    return hidden.gather(1, pred[..., None].expand(-1, -1, hidden.shape[-1]))


def _reasoner_pass(
    model: MemGenModel, stream, mask, frozen: int, cache=None, slots=None, adapter=None
) -> torch.Tensor:
    """The reasoner over the woven stream; its first ``frozen`` positions without autograd.

    Nothing before a row's first latent chunk depends on the weaver, so gradients there are
    pure waste: that prefix (the prompt, ~40% of a GSM8K sample) runs under ``no_grad`` into
    a KV cache and the rest attends to it, which saves its share of the backward pass.
    ``cache``: the (empty) cache to run into, e.g. a ``kv.slot_cache``. ``slots``: each
    column's kv-prefix row (``MemGenModel.input_prefix``), or None. ``adapter``: the columns
    where the weaver's adapter is on (``MemGenModel.adapter_at``), or None; nothing before the
    first chunk is one of them.
    """
    positions = positions_from_mask(mask)
    if not (torch.is_grad_enabled() and 0 < frozen < stream.shape[1]):
        return model.reasoner_hidden(stream, mask, positions, cache, slots, adapter)
    cache = cache if cache is not None else DynamicCache(config=model.reasoner.config)
    head_slots, tail_slots = (
        (None, None) if slots is None else (slots[:, :frozen], slots[:, frozen:])
    )
    with torch.no_grad():
        head = model.reasoner_hidden(
            stream[:, :frozen], mask[:, :frozen], positions[:, :frozen], cache, head_slots
        )
    tail_adapter = None if adapter is None else adapter[:, frozen:]
    tail = model.reasoner_hidden(
        stream[:, frozen:], mask, positions[:, frozen:], cache, tail_slots, tail_adapter
    )
    return torch.cat([head, tail], 1)


def _layout(model: MemGenModel, points: Points, length: int):
    """Sorted points and K per row, then where each token and each chunk goes in the stream
    (rows shifted so their first points share a column: ``align_offsets``)."""
    pts, ks = points.per_row(
        model.weaver.num_latents("prompt"), model.weaver.num_latents("inference")
    )
    token_pos, starts = stream_layout(pts, length, ks)
    offsets = align_offsets(pts, length)
    token_pos = token_pos + torch.tensor(offsets)[:, None]
    starts = [[s + off for s in row] for row, off in zip(starts, offsets, strict=True)]
    frozen = min(p[0] + 1 + off if p else length + off for p, off in zip(pts, offsets, strict=True))
    return pts, ks, token_pos, starts, frozen


def _weave_hidden_kv(model: MemGenModel, input_ids, attention_mask, points: Points):
    """``weave_hidden`` for ``memory.inject: kv`` (the mechanism is in the module docstring)."""
    stream, mask, index, token_pos, frozen = _query_stream(model, input_ids, attention_mask, points)
    slots = index >= 0
    positions = positions_from_mask(mask)  # one tensor for both passes: the slots' positions
    keys, values = [], []
    if bool(slots.any()):
        end = int(slots.nonzero()[:, 1].max()) + 1  # nothing after the last slot is needed
        weaver_cache = DynamicCache(config=model.weaver_lm.config)
        with model.weaver_adapter():
            model.weaver_lm.get_decoder()(
                inputs_embeds=stream[:, :end],
                attention_mask=mask[:, :end],
                position_ids=positions[:, :end],
                past_key_values=weaver_cache,
                use_cache=True,
            )
        keys = [layer.keys for layer in weaver_cache.layers]
        values = [layer.values for layer in weaver_cache.layers]
        if model.weaver.prefix_keys is not None:
            keys, values = model.add_prefix(keys, values, index[:, :end], positions[:, :end])
    placeholders = torch.where(slots[..., None], 0.0, stream.detach())
    if keys:
        cache = slot_cache(model.reasoner.config, keys, values, slots)
        hidden = _reasoner_pass(model, placeholders, mask, frozen, cache)
    else:
        hidden = _reasoner_pass(model, placeholders, mask, frozen)
    return _at_tokens(hidden, token_pos)


def _slot_index(model: MemGenModel, points: Points, starts, ks, shape) -> torch.Tensor:
    """Each stream column's row of the kv prefix (``Weaver.prefix_rows``), -1 off the slots."""
    index = torch.full(shape, -1, dtype=torch.long)
    for b, (row_starts, row_k) in enumerate(zip(starts, ks, strict=True)):
        kinds = [kind for kind, row_points in points.rounds() if row_points[b] is not None]
        for start, k, kind in zip(row_starts, row_k, kinds, strict=True):
            index[b, start : start + k] = model.weaver.prefix_rows(kind, k)
    return index


def _assemble(embeds, attention_mask, woven, points: Points, token_pos, starts, ks):
    """Place the real tokens' embeddings and every latent chunk into one padded stream."""
    batch, length, dim = embeds.shape
    rows, cols, values, flags = [], [], [], []

    def put(b, where, vecs, mask):
        rows.append(torch.full((len(where),), b))
        cols.append(where)
        values.append(vecs)
        flags.append(mask)

    real = attention_mask.bool().cpu()
    for b in range(batch):
        put(b, token_pos[b, real[b]], embeds[b, real[b]], attention_mask[b, real[b]])
        chunks = [
            r for r, (_, row_points) in enumerate(points.rounds()) if row_points[b] is not None
        ]
        for r, start, k in zip(chunks, starts[b], ks[b], strict=True):
            put(b, torch.arange(start, start + k), woven[r][b], attention_mask.new_ones(k))
    index = (torch.cat(rows).to(embeds.device), torch.cat(cols).to(embeds.device))
    size = int(index[1].max()) + 1
    stream = embeds.new_zeros(batch, size, dim).index_put(index, torch.cat(values))
    mask = attention_mask.new_zeros(batch, size).index_put(index, torch.cat(flags))
    return stream, mask
