"""Row surgery on a KV cache, so a weaving event touches only the rows that weave.

Generation keeps one rectangular reasoner cache for the batch. When a few rows weave, their
K-position chunk is run on those rows alone (``take_rows``) and the new keys/values are
appended back with zero, masked slots for the other rows (``append_rows``); a masked slot gets
zero attention weight, so the result equals running the chunk on the whole batch with masked
slots, at a fraction of the cost. Only the public ``DynamicCache.update`` is used to write.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def take_rows(
    cache: DynamicCache, config, rows: torch.Tensor, keep: torch.Tensor | None = None
) -> DynamicCache:
    """A new cache holding copies of ``rows`` (1-D indices); ``keep`` (T,) selects positions.

    ``keep`` is only meaningful for a single row (dropping its masked padding slots).
    """
    out = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys[rows], layer.values[rows]
        if keep is not None:
            keys, values = keys[:, :, keep], values[:, :, keep]
        out.update(keys, values, index)
    return out


def append_rows(cache: DynamicCache, part: DynamicCache, rows: torch.Tensor, k: int) -> None:
    """Append the last ``k`` positions of ``part`` (a cache of ``rows``) to ``cache``.

    Rows not in ``rows`` get zero slots; the caller masks them out.
    """
    for index, (layer, sub) in enumerate(zip(cache.layers, part.layers, strict=True)):
        batch, heads, _, dim = layer.keys.shape
        keys = layer.keys.new_zeros(batch, heads, k, dim)
        values = layer.values.new_zeros(batch, layer.values.shape[1], k, layer.values.shape[-1])
        keys[rows] = sub.keys[:, :, -k:]
        values[rows] = sub.values[:, :, -k:]
        cache.update(keys, values, index)
