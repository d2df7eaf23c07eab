"""Golden values for the pure latent-bookkeeping functions."""

import torch

from memgen_cli.models.latents import (
    align_offsets,
    chunk_mask,
    delimiter_table,
    latent_positions,
    positions_from_mask,
    prediction_positions,
    stream_layout,
)


def test_positions_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 1, 2]]


def test_latents_take_real_positions_and_text_shifts_by_k():
    start = torch.tensor([4, 7])
    assert latent_positions(start, 3).tolist() == [[4, 5, 6], [7, 8, 9]]
    # Rows that do not insert get masked slots, so the batch stays rectangular.
    assert chunk_mask(torch.tensor([False, True]), 3).tolist() == [[0, 0, 0], [1, 1, 1]]


def test_stream_layout_golden():
    # Row 0: 3 latents after token 1; row 1: 2 after token 0 and 2 after token 3.
    pos, starts = stream_layout([[1], [0, 3]], 5, [[3], [2, 2]])
    assert pos.tolist() == [[0, 1, 5, 6, 7], [0, 3, 4, 5, 8]]
    assert starts == [[2], [1, 6]]
    # The token after an insertion is predicted from the last latent of the chunk.
    assert prediction_positions(pos, [[1], [0, 3]], [[3], [2, 2]]).tolist() == [
        [0, 4, 5, 6, 7],
        [2, 3, 4, 7, 8],
    ]


def test_stream_layout_without_points_is_identity():
    pos, starts = stream_layout([[], []], 3, [[], []])
    assert pos.tolist() == [[0, 1, 2], [0, 1, 2]] and starts == [[], []]


def test_delimiter_table_marks_clause_ends_only(tokenizer):
    table = delimiter_table(tokenizer, [",", ".", "\n"])
    ids = {text: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[0] for text in ",.\nab7"}
    assert table[ids[","]] and table[ids["."]] and table[ids["\n"]]
    assert not table[ids["a"]] and not table[ids["b"]] and not table[ids["7"]]
    assert not table[tokenizer.eos_token_id] and not table[tokenizer.pad_token_id]
    assert int(table.sum()) == 3


def test_align_offsets_line_up_first_points():
    # First points 5, 2 and (no points) the last token 3 all move to column 5.
    assert align_offsets([[5, 9], [2], []], 4) == [0, 3, 2]
    assert align_offsets([[1], [1]], 3) == [0, 0]


def test_doctests():
    import doctest

    from memgen_cli.models import latents

    assert doctest.testmod(latents).failed == 0
