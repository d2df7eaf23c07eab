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

``memory.inject: kv`` writes the weaver's own keys and values (``SlotKV``) into K columns of
the reasoner's cache with the same two moves (``write_slots`` into masked columns,
``append_slots`` as new ones), and the training forward substitutes them at placeholder
columns of one stream (``slot_cache``: ``SlotLayer``). Keys are cached after the rotary
embedding, so a slot's keys are valid only at the position the weaver computed them at:
``check_positions`` holds every write to that.

``growing_cache`` is a DynamicCache whose full-attention layers append into spare capacity
(``GrowingLayer``) instead of concatenating: DynamicLayer copies the whole cache at every
update, which was 9 % of a 128-token weaver rollout on the 2-core CPU (7.3 of 82 s, profiled).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    _write(
        cache,
        [s.keys[:, :, -k:] for s in part.layers],
        [s.values[:, :, -k:] for s in part.layers],
        rows,
        cols,
    )


def _write(cache: DynamicCache, keys: list, values: list, rows, cols) -> None:
    r = rows[:, None]
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        # (n, heads, k, dim) -> (n, k, heads, dim): advanced indices on dims 0 and 2 go first
        layer.keys[r, :, cols] = k.transpose(1, 2)
        layer.values[r, :, cols] = v.transpose(1, 2)


# ------------------------------------------------------------------------ memory.inject: kv
@dataclass
class SlotKV:
    """The weaver's keys and values at K memory slots, per layer: what ``memory.inject: kv``
    writes into the reasoner's cache. Keys are rotated at ``positions``: they mean what the
    weaver meant only in columns that sit at exactly those positions."""

    keys: list[torch.Tensor]  # per layer (B, kv_heads, K, head_dim): GQA caches are per KV head
    values: list[torch.Tensor]
    positions: torch.Tensor  # (B, K)

    def select(self, rows: torch.Tensor) -> SlotKV:
        return SlotKV(
            [k[rows] for k in self.keys], [v[rows] for v in self.values], self.positions[rows]
        )

    @staticmethod
    def cat(parts: list[SlotKV]) -> SlotKV:
        """Rows of several SlotKVs, in order, as one."""
        return SlotKV(
            [torch.cat(layer) for layer in zip(*(p.keys for p in parts), strict=True)],
            [torch.cat(layer) for layer in zip(*(p.values for p in parts), strict=True)],
            torch.cat([p.positions for p in parts]),
        )


def check_positions(slots: SlotKV, positions: torch.Tensor) -> None:
    """Refuse to write memory slots at positions other than those the weaver computed them at.

    A rotated key at the wrong position is not an error the model can see: attention would
    just read another memory (the score depends on q·R(n−m)k). So it is checked, not trusted.
    """
    if not torch.equal(slots.positions.to(positions.device), positions):
        raise RuntimeError(
            "memory slots computed at positions "
            f"{slots.positions.tolist()} would be written at {positions.tolist()}: keys are "
            "cached after the rotary embedding, so slots must sit where they were computed"
        )


def write_slots(cache: DynamicCache, slots: SlotKV, rows, cols, positions) -> None:
    """Write ``slots`` (of ``rows``) into columns ``cols`` (len(rows), K) of those rows of
    ``cache``, in place; ``positions`` (len(rows), K) are the positions those columns stand
    for. The caller unmasks the columns."""
    check_positions(slots, positions)
    _write(cache, slots.keys, slots.values, rows, cols)


def append_slots(cache: DynamicCache, slots: SlotKV, rows, positions, batch: int) -> None:
    """Append ``slots`` (of ``rows``) as K new columns of ``cache``; the other rows of the
    ``batch`` get zero slots, which the caller masks."""
    check_positions(slots, positions)
    for index, (k, v) in enumerate(zip(slots.keys, slots.values, strict=True)):
        keys = k.new_zeros(batch, *k.shape[1:]).index_copy(0, rows, k)
        values = v.new_zeros(batch, *v.shape[1:]).index_copy(0, rows, v)
        cache.update(keys, values, index)


class SlotLayer(DynamicLayer):
    """A DynamicLayer that substitutes the weaver's keys and values at memory-slot columns.

    The training forward runs the reasoner once over a stream with placeholder columns where
    the slots go. As each layer writes its keys and values for columns [t, t + n), this
    layer replaces them at the slot columns with the weaver's (``torch.where``: a new tensor,
    never an in-place write, so autograd carries every later token's gradient back into the
    weaver through attention at every layer). The placeholders' own outputs are never read.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        super().__init__()
        self.slot_keys, self.slot_values = keys, values  # (B, kv_heads, T, dim)
        self.slots = slots  # (B, T) bool: True at slot columns

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        where = self.slots[:, None, start:end, None]
        key_states = torch.where(where, self.slot_keys[:, :, start:end], key_states)
        value_states = torch.where(where, self.slot_values[:, :, start:end], value_states)
        return super().update(key_states, value_states, *args, **kwargs)


def slot_cache(config, keys: list, values: list, slots: torch.Tensor) -> DynamicCache:
    """A cache for one pass over a stream of ``slots.shape[1]`` columns whose layer i takes
    ``keys[i]`` / ``values[i]`` (B, kv_heads, T' <= T, dim; the weaver's, over the stream's
    first T' columns) at the columns where ``slots`` (B, T) is True."""
    cache = DynamicCache(config=config)
    pad = slots.shape[1]
    cache.layers = [
        SlotLayer(_pad_to(k, pad), _pad_to(v, pad), slots)
        for k, v in zip(keys, values, strict=True)
    ]
    return cache


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, h, T, d) -> (B, h, length, d), zeros after T."""
    extra = length - t.shape[2]
    return t if extra == 0 else torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], 2)
