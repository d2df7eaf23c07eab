"""The memory weaver's own tensors: query latents, their norms and scales, and projections.

The weaver's backbone (a causal LM carrying the ``weaver`` LoRA adapter) is *not* a submodule
here: with the default shared backbone it is the reasoner's model, and its weights must never
be saved with the weaver. ``memgen.py`` runs the backbone; this module only prepares its inputs
and reads its outputs, so ``state_dict()`` holds exactly what ``weaver.safetensors`` stores.

Projection initialisation (``projection_init``):
- ``identity`` (default): ``reasoner_to_weaver`` is the identity when the hidden sizes match (the
  weaver then reads the very embeddings the reasoner reads), and ``weaver_to_reasoner`` is the
  identity scaled so a final-layer hidden state lands at the RMS of the reasoner's token
  embeddings. Untrained latents therefore look like token embeddings in scale, instead of
  random vectors far outside the embedding distribution.
- ``neutral``: ``reasoner_to_weaver`` as in ``identity``; ``weaver_to_reasoner`` starts at
  zero weight with its bias at the embedding of a neutral token (a space), so an untrained
  weaver writes K spaces. Measured (benchmarks/insertion_cost.py, arithmetic recipe, latents
  before each result): the ``identity`` start costs the reasoner +1.07 nats of held-out loss,
  zero vectors +0.80, spaces +0.34. The read-out learns from the first step (its gradient is
  the latents' gradient times the weaver's states), as LoRA's zero-initialised B does.
- ``random``: both projections start as ``nn.Linear``'s default, as the official code does.

With ``memory.inject: kv`` (``projections=False``) there are no projections: the weaver reads
the reasoner's embeddings as they are (the backbone is shared) and what it writes is its own
keys and values, so the two hidden x hidden maps would be parameters that get no gradient.
With ``memory.weaver_reads: cache`` the weaver reads the context as the reasoner's cached keys and
values (its adapter acts at its K query positions only), so ``reasoner_to_weaver`` is not made.
``memory.kv_prefix`` adds a learned key and value per layer and slot (``prefix_keys`` /
``prefix_values``) that the weaver's own at that slot add to (kv), or that the reasoner's own
over the latents add to (input: ``MemGenModel.input_prefix``).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("prompt", "inference")
INITS = ("identity", "neutral", "random")
INJECTS = ("input", "kv")  # memory.inject: where the memory enters the reasoner (memgen.py)
READS = ("context", "cache")  # memory.weaver_reads: what the weaver reads the context as


class Weaver(nn.Module):
    def __init__(
        self,
        reasoner_hidden: int,
        weaver_hidden: int,
        prompt_latents: int,
        inference_latents: int,
        projection_init: str = "identity",
        embedding_rms: float = 1.0,
        hidden_rms: float = 1.0,
        neutral_embedding: torch.Tensor | None = None,
        projections: bool = True,
        reads_context: bool = True,
        prefix: tuple[int, int, int] | None = None,
        prefix_rate: float = 1.0,
    ):
        super().__init__()
        # memory.kv_prefix: (layers, kv_heads, head_dim) of a learned key and value per layer
        # and slot that the weaver's own add to (memgen.py ``slot_prefix``); stored divided by
        # ``prefix_rate`` so it learns that much faster under Adam, and starts at zero.
        self.prefix_rate = float(prefix_rate)
        self.prefix_keys: nn.ParameterDict | None = None
        self.prefix_values: nn.ParameterDict | None = None
        if prefix is not None:
            layers, heads, dim = prefix
            sizes = {"prompt": prompt_latents, "inference": inference_latents}
            self.prefix_keys, self.prefix_values = (
                nn.ParameterDict(
                    {
                        kind: nn.Parameter(torch.zeros(layers, heads, k, dim))
                        for kind, k in sizes.items()
                    }
                )
                for _ in range(2)
            )
        self.queries = nn.ParameterDict(
            {
                "prompt": nn.Parameter(torch.randn(prompt_latents, weaver_hidden)),
                "inference": nn.Parameter(torch.randn(inference_latents, weaver_hidden)),
            }
        )
        self.norms = nn.ModuleDict({kind: nn.LayerNorm(weaver_hidden) for kind in KINDS})
        # LayerNorm output has unit RMS; start the scale at the weaver's token-embedding RMS so
        # the queries enter the backbone looking like ordinary inputs.
        self.scales = nn.ParameterDict(
            {kind: nn.Parameter(torch.tensor(float(embedding_rms))) for kind in KINDS}
        )
        if projection_init not in INITS:
            raise ValueError(f"projection_init must be one of {INITS}, not {projection_init}")
        self.reasoner_to_weaver: nn.Linear | None = None
        self.weaver_to_reasoner: nn.Linear | None = None
        if not projections:
            return
        # memory.weaver_reads: cache: the weaver reads the reasoner's keys and values, not its
        # embeddings, so there is nothing to map into the weaver.
        if reads_context:
            self.reasoner_to_weaver = nn.Linear(reasoner_hidden, weaver_hidden)
        self.weaver_to_reasoner = nn.Linear(weaver_hidden, reasoner_hidden)
        if projection_init in ("identity", "neutral"):
            if self.reasoner_to_weaver is not None:
                _identity_(self.reasoner_to_weaver, 1.0)
            _identity_(self.weaver_to_reasoner, embedding_rms / max(hidden_rms, 1e-6))
        if projection_init == "neutral":
            with torch.no_grad():
                self.weaver_to_reasoner.weight.zero_()
                if neutral_embedding is not None:
                    self.weaver_to_reasoner.bias.copy_(neutral_embedding)

    def num_latents(self, kind: str) -> int:
        return self.queries[kind].shape[0]

    def prefix_rows(self, kind: str, k: int) -> torch.Tensor:
        """The rows of ``prefix_table`` that K slots of ``kind`` read: (k,)."""
        first = 0 if kind == "prompt" else self.num_latents("prompt")
        return torch.arange(first, first + k)

    def prefix_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kv prefix as (layers, kv_heads, K_prompt + K_inference, head_dim) keys and values
        (prompt slots first), before rotation; None without ``memory.kv_prefix``."""
        if self.prefix_keys is None:
            return None
        return tuple(
            torch.cat([table[kind] for kind in KINDS], 2) * self.prefix_rate
            for table in (self.prefix_keys, self.prefix_values)
        )

    def query_embeds(self, kind: str, batch: int) -> torch.Tensor:
        """The K query latents of ``kind`` after LayerNorm and scale: (batch, K, weaver_hidden)."""
        q = self.norms[kind](self.queries[kind]) * self.scales[kind]
        return q.unsqueeze(0).expand(batch, -1, -1)


@torch.no_grad()
def _identity_(linear: nn.Linear, scale: float) -> None:
    """Scaled (rectangular) identity; for unequal sizes an orthogonal map of the same scale."""
    out_dim, in_dim = linear.weight.shape
    if out_dim == in_dim:
        linear.weight.copy_(torch.eye(out_dim) * scale)
    else:
        nn.init.orthogonal_(linear.weight)
        linear.weight.mul_(scale)
    linear.bias.zero_()
