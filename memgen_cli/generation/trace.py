"""What a generation returns and streams: the insertions and skips of its memory trace, the
per-row output, and the per-step events (``iter_generate`` yields them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Insertion:
    """One weaving event: where, what kind, how likely, and the vectors inserted."""

    row: int
    token_index: int  # completion tokens before the latents (0 = prompt insertion)
    kind: str  # "prompt" | "inference"
    trigger_prob: float | None  # None: inserted unconditionally (prompt, or untrained trigger)
    # (K, D_reasoner), after weaver_to_reasoner; (K, 0) with memory.inject kv, whose memory is
    # keys and values at every layer, not vectors in the input space
    latents: torch.Tensor
    weaver_states: torch.Tensor  # (K, D_weaver), the weaver's last hidden states at the slots
    inserted: bool = True  # False: woven, then suppressed by a ``keep`` filter (ablations)

    def summary(self) -> dict:
        return {
            "token_index": self.token_index,
            "kind": self.kind,
            "trigger_prob": self.trigger_prob,
            "num_latents": int(self.latents.shape[0]),
            "inserted": self.inserted,
        }


@dataclass
class Skip:
    """A clause boundary where a trained trigger decided not to invoke the weaver."""

    row: int
    token_index: int  # completion tokens before the boundary's decision
    trigger_prob: float


@dataclass
class MemoryTrace:
    insertions: list[Insertion] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)  # memory full, trained trigger only

    def for_row(self, row: int, include_dropped: bool = False) -> list[Insertion]:
        return [i for i in self.insertions if i.row == row and (i.inserted or include_dropped)]

    def skips_for_row(self, row: int) -> list[Skip]:
        return [s for s in self.skips if s.row == row]


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # completion token ids per row, EOS excluded
    trace: MemoryTrace
    finished: list[bool]  # stopped at EOS (vs. ran out of max_new_tokens)
    step_logits: list[torch.Tensor] | None = None  # per token index (B, V), if asked for
    # If asked for: log-prob of each chosen token under softmax(logits / temperature) (1 when
    # greedy), per row, plus the stop token's when the row finished; and that stop token's id.
    logprobs: list[list[float]] | None = None
    stop_tokens: list[int | None] | None = None


@dataclass
class StepEvent:
    """What one step produced, for streaming: the tokens chosen and the rows that wove.

    The first event of a run with memory carries the prompt insertions and no tokens.
    """

    tokens: torch.Tensor | None  # (B,), None for the prompt-insertion event
    active: torch.Tensor  # (B,) rows that picked a token at this step (others: placeholders)
    insertions: list[Insertion]
