"""Row surgery on a KV cache, so a weaving event touches only the rows that weave.

Generation keeps one rectangular reasoner cache for the batch. When a few rows weave, their
K-position chunk is run on those rows alone (``take_rows``) and the new keys/values are
appended back with zero, masked slots for the other rows (``append_rows``); a masked slot gets
zero attention weight, so the result equals running the chunk on the whole batch with masked
slots, at a fraction of the cost.

Rows weave at different steps, so appending K slots per event for the whole batch would grow
every row's cache by K for each other row's insertion (32 rows x 4 insertions x K 8 = 1,000
masked columns that every later decode step reads and copies). ``write_rows`` instead puts a
row's chunk into K of its own masked columns (left padding, or slots another row's event made):
keys carry their rotary positions from when they were computed and a decode step attends to
every earlier column its mask allows, so which column holds a key does not change the result
(full attention; ``free_slots`` says where this holds). New columns are appended only when a
row has fewer than K free slots.

``growing_cache`` is a DynamicCache whose full-attention layers append into spare capacity
(``GrowingLayer``) instead of concatenating: DynamicLayer copies the whole cache at every
update, which was 9 % of a 128-token weaver rollout on the 2-core CPU (7.3 of 82 s, profiled).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new positions into spare capacity of one buffer.

    ``keys``/``values`` stay what DynamicLayer's are (B, heads, T, dim), here prefix views of
    the buffers, so in-place writes (``write_rows``) and ``crop`` work unchanged; a tensor
    assigned to them from outside is adopted (copied into a new buffer) at the next update.
    The buffer grows by half its length (at least ``SPARE`` positions) when full. Under
    autograd it concatenates as DynamicLayer does: an in-place write would change a tensor the
    backward pass still needs.
    """

    SPARE = 64

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _owns(self, length: int) -> bool:
        if self._buffers is None:
            return False
        keys, values = self._buffers
        return (
            self.keys.data_ptr() == keys.data_ptr()
            and self.values.data_ptr() == values.data_ptr()
            and self.keys.shape[:2] == keys.shape[:2]
            and self.keys.stride() == keys.stride()
            and length <= keys.shape[2]
        )

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._buffers = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        if not self._owns(new):
            spare = max(self.SPARE, new // 2)
            self._buffers = tuple(
                src.new_empty(*src.shape[:2], new + spare, src.shape[-1])
                for src in (key_states, value_states)
            )
            if old:
                self._buffers[0][:, :, :old] = self.keys
                self._buffers[1][:, :, :old] = self.values
        keys, values = self._buffers
        keys[:, :, old:new] = key_states
        values[:, :, old:new] = value_states
        self.keys, self.values = keys[:, :, :new], values[:, :, :new]
        return self.keys, self.values


def growing_cache(config) -> DynamicCache:
    """A DynamicCache for ``config`` whose full-attention layers are ``GrowingLayer``s
    (sliding-window layers, which drop old positions, stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def take_rows(
    cache: DynamicCache, config, rows: torch.Tensor, keep: torch.Tensor | None = None
) -> DynamicCache:
    """A new cache holding copies of ``rows`` (1-D indices); ``keep`` (T,) selects positions.

    ``keep`` is only meaningful for a single row (dropping its masked padding slots).
    """
    out = growing_cache(config)
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


def reusable(config) -> bool:
    """Whether a row's keys may sit in any earlier column: full causal attention only (a
    sliding window masks by column distance, so a reused early column could fall outside it)."""
    window = getattr(config, "sliding_window", None)
    return not window or getattr(config, "use_sliding_window", True) is False


def free_slots(mask: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor | None:
    """The first ``k`` masked columns of each of ``rows`` in ``mask`` (B, T): (len(rows), k),
    or None when some row has fewer than ``k``.

    >>> free_slots(torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1]]), torch.tensor([0]), 2).tolist()
    [[0, 2]]
    >>> free_slots(torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1]]), torch.tensor([0, 1]), 2) is None
    True
    """
    free = mask[rows] == 0
    if bool((free.sum(-1) < k).any()):
        return None
    # the k smallest column indices with free == True: stable sort puts them first
    order = torch.sort((~free).to(torch.int8), dim=-1, stable=True).indices
    return order[:, :k]


def write_rows(cache: DynamicCache, part: DynamicCache, rows: torch.Tensor, cols: torch.Tensor):
    """Write the last k positions of ``part`` (a cache of ``rows``) into columns ``cols``
    (len(rows), k) of those rows of ``cache``, in place; the caller unmasks them."""
    k = cols.shape[1]
    r = rows[:, None]
    for layer, sub in zip(cache.layers, part.layers, strict=True):
        # (n, heads, k, dim) -> (n, k, heads, dim): advanced indices on dims 0 and 2 go first
        layer.keys[r, :, cols] = sub.keys[:, :, -k:].transpose(1, 2)
        layer.values[r, :, cols] = sub.values[:, :, -k:].transpose(1, 2)
