"""The memory trigger: decides INVOKE/SKIP at each clause boundary.

The paper's formulation: a small head over the reasoner's last-layer hidden state at the
delimiter token. It costs one tiny MLP per boundary at generation time, since the reasoner
computes that hidden state anyway. An untrained trigger always invokes (probability 1).
"""

from __future__ import annotations

import torch
from torch import nn


class Trigger(nn.Module):
    def __init__(self, reasoner_hidden: int, hidden: int = 256):
        super().__init__()
        self.head = nn.Sequential(
            nn.Linear(reasoner_hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )
        # A buffer, so it travels with the state dict into trigger.safetensors.
        self.register_buffer("trained", torch.tensor(False))

    @property
    def is_trained(self) -> bool:
        return bool(self.trained)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """INVOKE logits for hidden states (..., D) -> (...)."""
        return self.head(hidden.to(self.head[0].weight.dtype)).squeeze(-1)

    def probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """INVOKE probability; exactly 1 while untrained."""
        if not self.is_trained:
            return torch.ones(hidden.shape[:-1], device=hidden.device)
        return torch.sigmoid(self.logits(hidden)).float()
