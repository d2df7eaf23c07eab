"""The training forward's reference path: one sample at a time, the official code's calls.

``reference_weave_forward``: per sample, the weaver re-reads the whole prefix at every insertion
point, and every call is the one the official code makes (whole causal LMs,
vocabulary logits at every position). With kv, per sample, the weaver re-reads the prefix
(tokens and earlier query latents) at every point and the reasoner runs segment by segment,
the weaver's keys and values appended to an ordinary cache between segments. Tests require
this path and ``training.weave_forward`` to agree to 1e-4 in loss and in the gradient of every
trainable tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from memgen_cli.models.kv import check_positions
from memgen_cli.models.latents import latent_positions, prediction_positions, stream_layout
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import IGNORE, Points, WeaveOutput, hidden_loss


def reference_weave_forward(
    model: MemGenModel,
    input_ids,
    attention_mask,
    labels,
    points: Points,
    return_logits=False,
    official=True,
) -> WeaveOutput:
    """Per sample; the weaver re-reads the whole prefix (tokens + earlier latents) each time.

    With ``official=True`` (the default) it makes the official code's calls: the weaver's whole
    causal LM at every insertion point and the reasoner's logits over the whole woven stream,
    cross-entropy over every position with ignored labels. Those vocabulary projections outside
    the labelled tokens are thrown away, so ``official=False`` (the same loss and gradients)
    skips them and isolates the cost of re-reading prefixes and of going sample by sample.
    """
    pts, ks = points.per_row(
        model.weaver.num_latents("prompt"), model.weaver.num_latents("inference")
    )
    official = official and not (model.kv or model.reads_cache)  # not the official code's modes
    aligned_rows, logit_rows, total, count = [], [], 0.0, 0
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        tokens = model.embed(input_ids[b, real][None])
        kinds = [kind for _, kind in points.row(b)]
        if model.kv:
            row = tokens.new_zeros(input_ids.shape[1], tokens.shape[-1])
            hidden_kv = _reference_hidden_kv_on_cache if model.reads_cache else _reference_hidden_kv
            row[real] = hidden_kv(model, tokens, pts[b], kinds)
            aligned_rows.append(row)
            continue
        pieces, rows, prev = [], [], -1  # rows: each column's kv-prefix row (-1: a token)
        for point, kind in zip(pts[b], kinds, strict=True):
            pieces.append(tokens[:, prev + 1 : point + 1])
            rows.append(torch.full((point - prev,), -1))
            prefix = torch.cat(pieces, 1)
            ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
            pos = torch.arange(prefix.shape[1], device=prefix.device)[None]
            start = torch.tensor([prefix.shape[1]], device=prefix.device)
            if model.reads_cache:  # the reasoner reads the whole prefix, then the queries
                cache = DynamicCache(config=model.reasoner.config)
                seen = torch.cat(rows)[None].to(prefix.device)
                model.reasoner_hidden(prefix, ones, pos, cache, slots=seen)
                latents, _ = model.weave_on_cache(kind, cache, ones, start)
            else:
                latents, _ = model.weave(
                    kind, prefix, ones, pos, model.new_weaver_cache(), start, official=official
                )
            pieces.append(latents)
            rows.append(model.weaver.prefix_rows(kind, latents.shape[1]))
            prev = point
        pieces.append(tokens[:, prev + 1 :])
        stream = torch.cat(pieces, 1)
        slots = torch.cat([*rows, torch.full((tokens.shape[1] - prev - 1,), -1)])[None]
        ones = torch.ones(stream.shape[:2], dtype=torch.long, device=stream.device)
        pos = torch.arange(stream.shape[1], device=stream.device)[None]
        hidden = model.reasoner_hidden(stream, ones, pos, slots=slots.to(stream.device))[0]
        n = tokens.shape[1]
        token_pos, _ = stream_layout([pts[b]], n, [ks[b]])
        pred = prediction_positions(token_pos, [pts[b]], [ks[b]])[0].to(hidden.device)
        if official:
            logits = model.lm_head(hidden)[pred]  # every stream position, then the tokens' rows
            targets = labels[b, real][1:]
            total = total + F.cross_entropy(
                logits[:-1], targets, ignore_index=IGNORE, reduction="sum"
            )
            count += int((targets != IGNORE).sum())
            if return_logits:
                logit_rows.append(logits.new_zeros(input_ids.shape[1], logits.shape[-1]))
                logit_rows[-1][real] = logits
            continue
        row = hidden.new_zeros(input_ids.shape[1], hidden.shape[-1])
        row[real] = hidden[pred]
        aligned_rows.append(row)
    if not official:
        return hidden_loss(model, torch.stack(aligned_rows), labels, return_logits)
    loss = total / count if count else stream.sum() * 0.0
    return WeaveOutput(loss, torch.stack(logit_rows) if return_logits else None, count)


def _reference_hidden_kv(model: MemGenModel, tokens, row_points: list[int], kinds: list[str]):
    """One sample with ``memory.inject: kv``: the reasoner's hidden state at every token (n, D).

    At every point the weaver re-reads the whole prefix (tokens and earlier query latents at
    their positions) from an empty cache; the reasoner then runs segment by segment, each
    point's slots appended to its ordinary cache between segments, as generation would.
    """
    seen = tokens[:, :0]  # the weaver's input stream: tokens, and query latents at the slots
    memory, prev = [], -1
    for point, kind in zip(row_points, kinds, strict=True):
        seen = torch.cat([seen, tokens[:, prev + 1 : point + 1]], 1)
        n = seen.shape[1]
        ones = torch.ones(1, n, dtype=torch.long, device=seen.device)
        pos = torch.arange(n, device=seen.device)[None]
        start = torch.tensor([n], device=seen.device)
        slots, _ = model.weave_kv(kind, seen, ones, pos, model.new_weaver_cache(), start)
        memory.append(slots)
        seen = torch.cat([seen, model.weaver.query_embeds(kind, 1).to(seen.dtype)], 1)
        prev = point
    return _reference_segments(model, tokens, row_points, lambda i, cache, length: memory[i])


def _reference_hidden_kv_on_cache(model: MemGenModel, tokens, row_points, kinds) -> torch.Tensor:
    """One sample with ``memory.inject: kv`` and ``memory.weaver_reads: cache``: at each point
    the query latents read the reasoner's cache of everything before them, and their keys and
    values join it; the reasoner's hidden state at every token (n, D)."""

    def weave(i: int, cache, length: int):
        ones = torch.ones(1, length, dtype=torch.long, device=tokens.device)
        return model.weave_on_cache(kinds[i], cache, ones, torch.tensor([length]))[0]

    return _reference_segments(model, tokens, row_points, weave)


def _reference_segments(model: MemGenModel, tokens, row_points, slots_at) -> torch.Tensor:
    """The reasoner over one sample segment by segment into an ordinary cache, point i's
    memory (``slots_at(i, cache, length)``, a ``SlotKV``) appended after its segment, as
    generation would; its hidden state at every token (n, D)."""
    cache = DynamicCache(config=model.reasoner.config)
    hidden, prev, length = [], -1, 0
    for i, point in enumerate([*row_points, tokens.shape[1] - 1]):
        segment = tokens[:, prev + 1 : point + 1]
        if segment.shape[1]:
            pos = torch.arange(length, length + segment.shape[1], device=tokens.device)[None]
            ones = torch.ones(1, length + segment.shape[1], dtype=torch.long, device=tokens.device)
            hidden.append(model.reasoner_hidden(segment, ones, pos, cache)[0])
            length += segment.shape[1]
        if i < len(row_points):
            slots = slots_at(i, cache, length)
            k = slots.positions.shape[1]
            check_positions(slots, latent_positions(torch.tensor([length]), k).to(slots.positions))
            for layer, (keys, values) in enumerate(zip(slots.keys, slots.values, strict=True)):
                cache.update(keys, values, layer)
            length += k
        prev = point
    return torch.cat(hidden)
