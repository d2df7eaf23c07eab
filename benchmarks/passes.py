"""What one forward pass costs by shape, on the embedded model: the unit the generation ratio is made of.

Each weaving event needs two passes that cannot be merged (the weaver's pass over the row's new
context + K queries, then the reasoner's pass over the K latents: the second reads the first's
output), while a decode step is one pass over the batch. This prints the cost of those shapes
against a batch-8 decode step measured in the same run, with a 300-position cache, so the floor
of ``benchmarks/generation.py``'s ratio can be computed from measured numbers. Prints one JSON
object.

    .venv/bin/python benchmarks/passes.py [--repeat 8] [--context 300]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from memgen_cli.config import MemoryConfig
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel

SHAPES = {  # name: (rows, new positions, weaver adapter on)
    "decode_8x1": (8, 1, False),
    "decode_1x1": (1, 1, False),
    "reasoner_chunk_1x8": (1, 8, False),
    "weaver_1x28": (1, 28, True),
    "reasoner_chunk_8x8": (8, 8, False),
    "decode_plus_chunk_8x9": (8, 9, False),
}


def pass_ms(
    mg: MemGenModel, rows: int, new: int, adapter: bool, context: int, repeat: int
) -> float:
    decoder = mg.reasoner.get_decoder()
    cache = DynamicCache(config=mg.reasoner.config)
    hidden = mg.reasoner.config.hidden_size
    with torch.no_grad():
        decoder(
            inputs_embeds=torch.randn(rows, context, hidden), past_key_values=cache, use_cache=True
        )
        positions = torch.arange(context, context + new)[None].expand(rows, -1)
        times = []
        for _ in range(repeat + 1):
            step = DynamicCache(config=mg.reasoner.config)
            for index, layer in enumerate(cache.layers):
                step.update(layer.keys, layer.values, index)
            with mg.weaver_adapter() if adapter else nullcontext():
                start = time.perf_counter()
                decoder(
                    inputs_embeds=torch.randn(rows, new, hidden),
                    past_key_values=step,
                    use_cache=True,
                    position_ids=positions,
                )
                times.append(time.perf_counter() - start)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]  # median, after one warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--context", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base(device="cpu")
    mg = MemGenModel(base.model, base.tokenizer, MemoryConfig()).eval()
    ms = {name: pass_ms(mg, *shape, args.context, args.repeat) for name, shape in SHAPES.items()}
    decode = ms["decode_8x1"]
    event = ms["weaver_1x28"] + ms["reasoner_chunk_1x8"]
    print(
        json.dumps(
            {
                "context": args.context,
                "threads": torch.get_num_threads(),
                "pass_ms": {k: round(v, 1) for k, v in ms.items()},
                "in_decode_steps": {k: round(v / decode, 2) for k, v in ms.items()},
                "one_row_event_in_decode_steps": round(event / decode, 2),
                "fusing_chunk_into_decode_saves_ms": round(
                    ms["decode_8x1"] + ms["reasoner_chunk_1x8"] - ms["decode_plus_chunk_8x9"], 1
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
