"""Row surgery on KV caches: copies of chosen rows, and chunks appended with zero slots."""

import torch
from transformers import DynamicCache, LlamaConfig

from memgen_cli.models.kv import append_rows, take_rows

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
