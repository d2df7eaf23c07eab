"""What inserting latents costs the frozen reasoner before any training, by what is inserted.

On a recipe's held-out samples (the demo recipe by default), the reasoner's loss on the reference
solutions with memory off, with an untrained weaver as the recipe starts it, with the same weaver
at smaller output scales, and with constant latents in place of the weaver's output (zero
vectors, the embedding of one token). Insertions follow what generation does: the prompt point
and the first ``max_inference_insertions`` delimiters. The gap between ``memory_off`` and the
best constant is the cost of the insertions themselves (extra positions, shifted position ids),
which a trained weaver has to win back before its memory can help.

``kv`` gives the same for ``memory.inject: kv`` (a second copy of the reasoner): the untrained kv
weaver (its LoRA B starts at zero, so its slots are the reasoner's own keys and values of the
query latents), and the query latents set to constants (zero vectors, one token's embedding),
whose slots then hold what the reasoner makes of that constant at those positions. Prints one
JSON object.

    .venv/bin/python benchmarks/insertion_cost.py [--recipe recipes/....yaml] [--set key=value]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from transformers import set_seed

from memgen_cli.config import SFTConfig, load_recipe
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages.sft_weaver import load_examples
from memgen_cli.training.sft_data import SFTCollator, encode_examples, heldout_loss

DEMO = Path(__file__).resolve().parents[1] / "recipes/smollm2-135m/gsm_symbolic/sft-weaver.yaml"
TOKENS = {"newline": "\n", "space": " "}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEMO))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_recipe(SFTConfig, args.recipe, args.overrides)
    set_seed(cfg.training.seed)  # as sft-weaver seeds: the same untrained weaver
    m = cfg.model
    base = load_base(m.base, m.device, m.dtype, m.revision)
    model = MemGenModel(base.model, base.tokenizer, cfg.memory)
    _, _, held, _ = load_examples(cfg)
    samples, _ = encode_examples(model, held, cfg.data.prompt_suffix, None, cfg.data.max_length)
    pad, cap, batch = base.tokenizer.pad_token_id, cfg.memory.max_inference_insertions, 4
    woven = SFTCollator(pad, "first", cap, cfg.training.prompt_insertion)
    out = {"memory_off": heldout_loss(model, samples, SFTCollator(pad, memory=False), batch)}

    proj = model.weaver.weaver_to_reasoner
    weight, bias = proj.weight.detach().clone(), proj.bias.detach().clone()
    embeddings = model.reasoner.get_input_embeddings().weight.detach()
    starts = {f"weaver_x{s:g}": (weight * s, bias * s) for s in (1.0, 0.3, 0.1)}
    starts["zero"] = (weight * 0, bias * 0)
    for name, text in TOKENS.items():
        token = base.tokenizer.encode(text, add_special_tokens=False)[-1]
        starts[f"token_{name}"] = (weight * 0, embeddings[token].clone())
    for name, (w, b) in starts.items():
        with torch.no_grad():
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        out[name] = heldout_loss(model, samples, woven, batch)
    out_kv = kv_costs(cfg, samples, woven, batch, embeddings, base.tokenizer)
    print(
        json.dumps(
            {
                "benchmark": "insertion_cost",
                "recipe": args.recipe,
                "heldout_samples": len(samples),
                "insertions": {"prompt": 1, "inference_cap": cap},
                "latents": {
                    "prompt": cfg.memory.prompt_latents,
                    "inference": cfg.memory.inference_latents,
                },
                "heldout_loss": {k: round(v, 4) for k, v in out.items()},
                "heldout_loss_kv": {k: round(v, 4) for k, v in out_kv.items()},
            }
        )
    )


def kv_costs(cfg, samples, woven, batch, embeddings, tokenizer) -> dict[str, float]:
    """Held-out losses with ``memory.inject: kv``: the untrained kv weaver, then its query
    latents replaced by constants (LayerNorm weight 0, bias the constant, scale 1)."""
    set_seed(cfg.training.seed)
    m = cfg.model
    base = load_base(m.base, m.device, m.dtype, m.revision)
    model = MemGenModel(base.model, base.tokenizer, dataclasses.replace(cfg.memory, inject="kv"))
    out = {"weaver": heldout_loss(model, samples, woven, batch)}
    constants = {"zero": embeddings[0] * 0}
    for name, text in TOKENS.items():
        constants[f"token_{name}"] = embeddings[
            tokenizer.encode(text, add_special_tokens=False)[-1]
        ]
    for name, value in constants.items():
        with torch.no_grad():
            for kind, norm in model.weaver.norms.items():
                norm.weight.zero_()
                norm.bias.copy_(value)
                model.weaver.scales[kind].fill_(1.0)
        out[name] = heldout_loss(model, samples, woven, batch)
    return out


if __name__ == "__main__":
    main()
