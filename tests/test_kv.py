"""Row surgery on KV caches: copies of chosen rows, and chunks appended with zero slots."""

import torch
from transformers import DynamicCache, LlamaConfig

from memgen_cli.models.kv import (
    GrowingLayer,
    append_rows,
    free_slots,
    growing_cache,
    reusable,
    take_rows,
    write_rows,
)

CONFIG = LlamaConfig(
    num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=1
)


def cache_of(keys: list[torch.Tensor]) -> DynamicCache:
    cache = DynamicCache(config=CONFIG)
    for layer, k in enumerate(keys):
        cache.update(k, -k, layer)
    return cache


def test_take_rows_copies_rows_and_drops_positions():
    k = torch.arange(3 * 5, dtype=torch.float).reshape(3, 1, 5, 1)  # (B, heads, T, dim)
    cache = cache_of([k, k + 100])
    part = take_rows(cache, CONFIG, torch.tensor([2, 0]))
    assert torch.equal(part.layers[1].keys, (k + 100)[[2, 0]])
    assert torch.equal(part.layers[0].values, -k[[2, 0]])
    keep = torch.tensor([False, True, True, False, True])
    one = take_rows(cache, CONFIG, torch.tensor([1]), keep)
    assert one.layers[0].keys.flatten().tolist() == [6.0, 7.0, 9.0]
    part.layers[0].keys += 1  # a copy: the source is untouched
    assert torch.equal(cache.layers[0].keys, k)


def test_append_rows_puts_new_positions_on_their_rows_and_zeros_elsewhere():
    k = torch.ones(3, 1, 4, 2)
    cache = cache_of([k, k])
    part = take_rows(cache, CONFIG, torch.tensor([1]))
    new = torch.full((1, 1, 2, 2), 7.0)
    for layer in range(2):
        part.update(new, -new, layer)
    append_rows(cache, part, torch.tensor([1]), 2)
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape == (3, 1, 6, 2)
    assert torch.equal(keys[1, :, 4:], new[0]) and torch.equal(values[1, :, 4:], -new[0])
    assert keys[[0, 2], :, 4:].abs().sum() == 0 and values[[0, 2], :, 4:].abs().sum() == 0
    assert torch.equal(keys[:, :, :4], k)


def test_free_slots_finds_each_rows_first_masked_columns_or_none():
    mask = torch.tensor([[0, 0, 1, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1]])
    assert free_slots(mask, torch.tensor([0, 2]), 2).tolist() == [[0, 1], [1, 2]]
    assert free_slots(mask, torch.tensor([2]), 3).tolist() == [[1, 2, 3]]
    assert free_slots(mask, torch.tensor([0, 1]), 2) is None  # row 1 has one free column
    assert free_slots(mask, torch.tensor([1]), 1).tolist() == [[3]]


def test_write_rows_fills_the_given_columns_of_the_given_rows_only():
    k = torch.arange(3 * 5, dtype=torch.float).reshape(3, 1, 5, 1)
    cache = cache_of([k, k + 100])
    part = take_rows(cache, CONFIG, torch.tensor([2, 0]))
    new = torch.tensor([[7.0, 8.0], [9.0, 10.0]]).reshape(2, 1, 2, 1)
    for layer in range(2):
        part.update(new + layer, -(new + layer), layer)
    write_rows(cache, part, torch.tensor([2, 0]), torch.tensor([[1, 3], [0, 4]]))
    keys, values = cache.layers[1].keys, cache.layers[1].values
    assert keys.shape == (3, 1, 5, 1)  # nothing appended
    assert keys[2, 0, :, 0].tolist() == [110.0, 8.0, 112.0, 9.0, 114.0]
    assert keys[0, 0, :, 0].tolist() == [10.0, 101.0, 102.0, 103.0, 11.0]
    assert values[0, 0, 0, 0] == -10.0 and torch.equal(keys[1], (k + 100)[1])


def test_reusable_only_without_an_active_sliding_window():
    assert reusable(CONFIG)
    assert reusable(type("C", (), {"sliding_window": 4096, "use_sliding_window": False})())
    assert not reusable(type("C", (), {"sliding_window": 4096})())


def test_growing_layers_match_dynamic_ones_through_updates_crops_and_row_writes():
    plain, grown = DynamicCache(config=CONFIG), growing_cache(CONFIG)
    assert all(isinstance(layer, GrowingLayer) for layer in grown.layers)
    torch.manual_seed(0)
    for n in (5, 1, 1, 70, 3):  # 70 passes the spare capacity: the buffer grows
        for layer in range(2):
            k, v = torch.randn(3, 1, n, 4), torch.randn(3, 1, n, 4)
            want, got = plain.update(k, v, layer), grown.update(k, v, layer)
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        if n == 1:
            plain.crop(-1), grown.crop(-1)
    assert grown.get_seq_length() == plain.get_seq_length() == 78
    buffer = grown.layers[0]._buffers[0]
    assert buffer.shape[2] > 78 and grown.layers[0].keys.data_ptr() == buffer.data_ptr()
    part = take_rows(plain, CONFIG, torch.tensor([1]))
    new = torch.full((1, 1, 2, 4), 9.0)
    for layer in range(2):
        part.update(new, -new, layer)
    for cache in (plain, grown):  # in place, into the buffer's view
        write_rows(cache, part, torch.tensor([1]), torch.tensor([[0, 2]]))
    assert torch.equal(grown.layers[1].values, plain.layers[1].values)
    grown.layers[0].keys = grown.layers[0].keys[[2, 0]]  # assigned from outside: adopted
    grown.layers[0].values = grown.layers[0].values[[2, 0]]
    k = torch.randn(2, 1, 1, 4)
    keys, _ = grown.update(k, k, 0)
    assert torch.equal(keys, torch.cat([plain.layers[0].keys[[2, 0]], k], dim=2))


def test_growing_layers_concatenate_under_autograd():
    cache = growing_cache(CONFIG)
    cache.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), 0)
    k = torch.randn(1, 1, 1, 4, requires_grad=True)
    keys, values = cache.update(k, k * 2, 0)
    (keys.sum() + values.sum()).backward()  # an in-place write would have broken this
    assert torch.equal(k.grad, torch.full_like(k, 3.0))
