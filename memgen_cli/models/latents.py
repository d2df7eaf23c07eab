"""Pure tensor bookkeeping for latent insertion: delimiter tables, positions, stream layout.

No model code here: every function maps tensors to tensors and has golden-value tests
(tests/test_latents.py).
"""

from __future__ import annotations

import torch


def delimiter_table(tokenizer, delimiters: list[str]) -> torch.Tensor:
    """Bool table over the vocabulary: True where the token's text ends with a delimiter.

    Built once per tokenizer, so generation finds clause boundaries with one index lookup
    instead of decoding the sequence. Special tokens (EOS, chat markers) never count.
    """
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    special = set(tokenizer.all_special_ids)
    ends = tuple(delimiters)
    flags = [i not in special and text.endswith(ends) for i, text in enumerate(texts)]
    return torch.tensor(flags, dtype=torch.bool)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token.

    >>> positions_from_mask(torch.tensor([[0, 1, 1], [1, 1, 1]])).tolist()
    [[0, 0, 1], [0, 1, 2]]
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def latent_positions(start: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of a K-latent chunk that starts at ``start`` (B,): shape (B, K).

    Latents take real position ids; the text after them continues at start + K.

    >>> latent_positions(torch.tensor([3, 5]), 2).tolist()
    [[3, 4], [5, 6]]
    """
    return start[:, None] + torch.arange(k, device=start.device)[None, :]


def chunk_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Attention mask of a K-slot chunk: ones for rows that insert, zeros (masked slots) else.

    >>> chunk_mask(torch.tensor([True, False]), 2).tolist()
    [[1, 1], [0, 0]]
    """
    return rows.long()[:, None].expand(-1, k).contiguous()


def stream_layout(
    points: list[list[int]], length: int, k_per_point: list[list[int]]
) -> tuple[torch.Tensor, list[list[int]]]:
    """Where each original token and each latent chunk goes once latents are inserted.

    ``points[b]`` are sorted token indices after which a chunk of ``k_per_point[b][r]`` latents
    is inserted. Returns ``token_pos`` (B, length): the stream index of every original token, and
    ``chunk_start[b][r]``: the stream index of the first latent of chunk r of row b.

    >>> pos, starts = stream_layout([[1], [0, 2]], 4, [[2], [2, 1]])
    >>> pos.tolist(), starts
    ([[0, 1, 4, 5], [0, 3, 4, 6]], [[2], [1, 5]])
    """
    token_pos = torch.arange(length).repeat(len(points), 1)
    starts: list[list[int]] = []
    for b, (row_points, row_k) in enumerate(zip(points, k_per_point, strict=True)):
        shift, row_starts = 0, []
        for point, k in zip(row_points, row_k, strict=True):
            row_starts.append(point + 1 + shift)
            shift += k
            token_pos[b, point + 1 :] += k
        starts.append(row_starts)
    return token_pos, starts


def prediction_positions(
    token_pos: torch.Tensor, points: list[list[int]], k_per_point
) -> torch.Tensor:
    """Stream index whose output predicts the token after each original token.

    That is the token itself, or the last latent of a chunk inserted right after it (the
    reasoner reads the latents before it writes the next token).

    >>> pos, _ = stream_layout([[1]], 3, [[2]])
    >>> prediction_positions(pos, [[1]], [[2]]).tolist()
    [[0, 3, 4]]
    """
    pred = token_pos.clone()
    for b, (row_points, row_k) in enumerate(zip(points, k_per_point, strict=True)):
        for point, k in zip(row_points, row_k, strict=True):
            pred[b, point] += k
    return pred


def align_offsets(points: list[list[int]], length: int) -> list[int]:
    """Left shifts that put every row's first insertion point in the same stream column.

    Nothing before a row's first latent chunk depends on the weaver, so once the first points
    line up, the whole block before them runs without autograd for every row (see
    ``training._reasoner_pass``). A row without points counts as a point at its last token.

    >>> align_offsets([[5, 9], [2], []], 4)
    [0, 3, 2]
    """
    firsts = [row[0] if row else length - 1 for row in points]
    return [max(firsts) - f for f in firsts]
