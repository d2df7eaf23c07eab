"""How the weaver's projections start: an untrained ``neutral`` weaver writes spaces."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from memgen_cli.config import MemoryConfig
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.weaver import Weaver


def test_neutral_start_writes_the_space_embedding_and_still_learns():
    reasoner, tok = make_model("llama")
    cfg = MemoryConfig(prompt_latents=3, inference_latents=2, projection_init="neutral")
    mg = MemGenModel(reasoner, tok, cfg)
    space = reasoner.get_input_embeddings().weight[tok.encode(" ", add_special_tokens=False)[-1]]
    ctx = torch.randn(2, 5, space.shape[0])
    mask = torch.ones(2, 5, dtype=torch.long)
    positions = torch.arange(5).expand(2, 5)
    latents, _ = mg.weave(
        "prompt", ctx, mask, positions, mg.new_weaver_cache(), torch.tensor([5, 5])
    )
    assert latents.shape == (2, 3, space.shape[0])
    torch.testing.assert_close(latents, space.detach().expand_as(latents), rtol=0, atol=1e-6)
    # The read-out gets a gradient at once (the weaver's states times the latents' gradient).
    latents.float().pow(2).sum().backward()
    assert mg.weaver.weaver_to_reasoner.weight.grad.abs().sum() > 0


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="identity"):
        Weaver(8, 8, 2, 2, projection_init="zeros")
