"""A completion as text, with a marker where memory went in: ``2 + 3 ⟨mem 8⟩ = 5``.

``memgen generate`` prints it, ``inspect-memory`` names each marker's insertion, and GRPO's
completion logs write it; one rendering for all three, below the stages and training that use it.
"""

from __future__ import annotations

from memgen_cli.generation import Insertion

MARKER = "⟨mem {}⟩"


def segments(tokenizer, tokens: list[int], insertions: list[Insertion]) -> list[tuple[str, str]]:
    """Split a completion into ("text", s) and ("mem", marker) pieces, in order."""
    out: list[tuple[str, str]] = []
    cuts = sorted(insertions, key=lambda i: i.token_index)
    start = 0
    for ins in cuts:
        if ins.token_index > start:
            out.append(
                (
                    "text",
                    tokenizer.decode(tokens[start : ins.token_index], skip_special_tokens=True),
                )
            )
            start = ins.token_index
        out.append(("mem", MARKER.format(ins.latents.shape[0])))
    out.append(("text", tokenizer.decode(tokens[start:], skip_special_tokens=True)))
    return [piece for piece in out if piece[1]]
