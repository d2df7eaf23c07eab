"""The episode engine's cost per turn, as ratios in one process: does a late turn cost what an
early one does (the caches are kept, nothing is re-read), and what does re-encoding the whole
history every turn (the official code's multi-turn path) cost beside it?

Run: .venv/bin/python benchmarks/episodes.py [--base smollm2-135m] [--batch 8] [--turns 10]
    [--tokens 16] [--repeats 2] [--memory weaver]

A batch of ``--batch`` episodes of a scripted text game (a TextWorld-like room description of
about 90 tokens and its commands each turn, never done) is played for ``--turns`` turns;
every reply is exactly ``--tokens`` tokens (greedy, EOS ignored), so every turn does the same
work and only the history grows. Memory ``weaver``: prompt latents (K 8) where each turn begins
and up to 5 inference insertions per turn (``MemoryConfig`` defaults otherwise). Three ways:

- ``kept``: ``episodes.play``, latents kept across turns (``keep_latents`` true);
- ``rewound``: ``episodes.play`` with ``keep_latents`` false (each turn's caches rewound, its
  reply re-read as text: the official code's semantics at the engine's cost);
- ``reencode``: the official way: each turn re-templates the whole text history, encodes it
  from scratch and generates (our cached ``generate`` within the turn), latents not kept.

A turn's time is the time between the environment's steps of consecutive turns (append the
answer, weave, decode). The three ways run in ``--repeats`` interleaved rounds, and each keeps
per turn its best round. Prints one JSON object: ``turn_s`` (per way, per turn), for each way
``*_late_over_early`` (turn ``--turns`` / turn 2; the target for ``kept`` is 1.3 at most),
``reencode_over_kept_late`` and ``reencode_over_kept_total`` (the official way's time over the
kept cache's, at the last turn and summed over turns), ``rewound_over_kept_total``, and the
history's length in tokens at the last turn (``history_tokens``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.data.environment import Observation
from memgen_cli.generation import EpisodeConfig, encode_prompts, generate, parse_action, play
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel

ROOM = (
    "-= {name} =-\nYou've entered a {name}. You begin to take stock of what's in the room.\n\n"
    "You see a closed chest and a table. On the table you make out a lamp and a key. There is "
    "an open door leading east and an unblocked exit to the south.\n\nAvailable commands: go "
    "east, go south, open chest, take key, take lamp, examine table, inventory, look."
)
NAMES = ["kitchen", "attic", "cellar", "garden", "library", "pantry", "studio", "vault"]


class Scripted:
    """A text game that never ends; its answer is a room description of fixed length."""

    def __init__(self, seed: int, stamps: list[float] | None = None):
        self.seed, self.turn, self.stamps = seed, 0, stamps

    def _observe(self) -> Observation:
        name = NAMES[(self.seed + self.turn) % len(NAMES)]
        return Observation(ROOM.format(name=name), ["go east", "go south", "look"])

    def reset(self) -> Observation:
        self.turn = 0
        return self._observe()

    def step(self, action: str | None) -> Observation:
        if self.stamps is not None:  # the first row's steps time the turns
            self.stamps.append(time.perf_counter())
        self.turn += 1
        return self._observe()

    def close(self) -> None:
        pass


def reencode_play(model, envs, cfg: GenerationConfig, turns: int) -> int:
    """The official way: every turn, the whole text history re-templated, encoded from scratch,
    then one generation. Returns the last turn's history length in tokens."""
    tok = model.tokenizer
    first = [env.reset() for env in envs]
    chats = [[{"role": "user", "content": o.text}] for o in first]
    last = first
    for _ in range(turns):
        enc = encode_prompts(tok, chats, model.device)
        out = generate(model, enc["input_ids"], enc["attention_mask"], cfg)
        for r, env in enumerate(envs):
            reply = tok.decode(out.tokens[r], skip_special_tokens=True)
            last[r] = env.step(parse_action(reply, last[r].commands))
            chats[r] += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": last[r].text},
            ]
    return int(enc["attention_mask"].sum(1).max())


def turn_times(stamps: list[float], start: float) -> list[float]:
    """Seconds per turn from the first row's step times (turn 1 includes the first prompt)."""
    edges = [start, *stamps]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def run(base: str, batch: int, turns: int, tokens: int, repeats: int, memory: str) -> dict:
    torch.manual_seed(0)
    loaded = load_base(base, device="cpu")
    model = MemGenModel(loaded.model, loaded.tokenizer, MemoryConfig(max_inference_insertions=5))
    model.eval()
    cfg = GenerationConfig(max_new_tokens=tokens, memory=memory, ignore_eos=True)
    ways = {
        "kept": lambda envs: play(model, envs, cfg, EpisodeConfig(turns, keep_latents=True)),
        "rewound": lambda envs: play(model, envs, cfg, EpisodeConfig(turns, keep_latents=False)),
        "reencode": lambda envs: reencode_play(model, envs, cfg, turns),
    }
    best: dict[str, list[float]] = {}
    history = 0
    play(model, [Scripted(0)], dataclasses.replace(cfg, max_new_tokens=2), EpisodeConfig(2))
    for _ in range(repeats):  # interleaved rounds: a slow spell hits every way alike
        for name, fn in ways.items():
            stamps: list[float] = []
            envs = [Scripted(r, stamps if r == 0 else None) for r in range(batch)]
            start = time.perf_counter()
            out = fn(envs)
            if name == "reencode":
                history = out
            times = turn_times(stamps, start)
            best[name] = [min(a, b) for a, b in zip(best.get(name, times), times, strict=True)]
    late, early = turns - 1, 1  # turn ``turns`` and turn 2, 0-based
    result = {
        "base": base,
        "batch": batch,
        "turns": turns,
        "tokens_per_reply": tokens,
        "memory": memory,
        "history_tokens": history,
        "turn_s": {name: [round(t, 4) for t in times] for name, times in best.items()},
    }
    for name, times in best.items():
        result[f"{name}_late_over_early"] = round(times[late] / times[early], 3)
    kept, reencode = best["kept"], best["reencode"]
    result["reencode_over_kept_late"] = round(reencode[late] / kept[late], 3)
    result["reencode_over_kept_total"] = round(sum(reencode[1:]) / sum(kept[1:]), 3)
    result["rewound_over_kept_total"] = round(sum(best["rewound"][1:]) / sum(kept[1:]), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m", help="alias, hub id or model directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per reply")
    parser.add_argument("--repeats", type=int, default=2, help="best of N interleaved rounds")
    parser.add_argument("--memory", default="weaver", choices=["off", "weaver"])
    args = parser.parse_args()
    if args.turns < 3:
        parser.error("--turns must be at least 3 (turn 2 is the early turn)")
    result = run(args.base, args.batch, args.turns, args.tokens, args.repeats, args.memory)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
