"""SFT samples as tensors: chat-formatted prompt + target, the loss mask, the insertion schedule.

Tokenisation (``encode_examples``): the prompt is the tokenizer's own chat template with the
generation prompt, rendered exactly as ``generate`` renders it; the target is the reference
solution followed by EOS. Labels are -100 everywhere except on the target, so the loss covers
only the assistant's answer. A sample longer than ``max_length`` is dropped (and counted), never
truncated mid-answer.

Insertion schedule (``SFTCollator``): one prompt point per row (the last prompt token, so the
prompt latents sit where the assistant turn begins) and inference points at delimiters of the
*target* (paper Appendix B.1):

- ``first``: the first ``cap`` delimiters, as the official code does, and as generation does
  with an untrained trigger (it inserts at every clause boundary until the cap);
- ``random``: a random subset of ``cap`` delimiters (the paper's description), drawn anew per
  sample and epoch from ``(seed, epoch, sample index)`` so that a resumed run draws the same;
- ``all``: every delimiter of the target, beyond the cap;
- ``subsets``: each of the first ``cap`` delimiters kept with probability 1/2, drawn as
  ``random`` is (ours, not the paper's). A weaver trained on every delimiter depends on all of
  them: on the arithmetic recipe, latents at only some of its clause boundaries scored below
  latents at none (25 % vs 35 % with all, n 200), so a trigger could not skip any. Trained on
  random subsets, the weaver works whatever subset a trigger picks.

``heldout_loss`` scores encoded samples without training (memory off, or with a collator's
insertion points).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from memgen_cli.data import Example, to_messages
from memgen_cli.errors import MemgenError
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import (
    IGNORE,
    Points,
    delimiter_positions,
    select_points,
    weave_forward,
)

SCHEDULES = ("first", "random", "all", "subsets")


@dataclass
class Encoded:
    """One tokenised sample: ``input_ids[:prompt_len]`` is the prompt, the rest the target."""

    input_ids: list[int]
    prompt_len: int
    candidates: list[int]  # token indices in the target that end a clause (insertion points)
    index: int  # position in the training set (seeds the random schedule)


def prompt_text(tokenizer, example: Example, prompt_suffix: str, system: str | None) -> str:
    messages = to_messages(example, prompt_suffix, system)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def target_text(example: Example) -> str:
    """The SFT target: the worked solution, or the bare answer for answer-only tasks."""
    return example.solution if example.solution else example.answer


def encode_examples(
    model: MemGenModel,
    examples: list[Example],
    prompt_suffix: str,
    system: str | None,
    max_length: int,
) -> tuple[list[Encoded], int]:
    """Tokenise ``examples``; returns the kept samples and how many were too long."""
    pairs, dropped = tokenize_samples(model.tokenizer, examples, prompt_suffix, system, max_length)
    kept = [
        Encoded(ids, n, delimiter_positions(model, torch.tensor(ids), n, len(ids)), index)
        for index, (ids, n) in enumerate(pairs)
    ]
    return kept, dropped


def tokenize_samples(
    tok, examples: list[Example], prompt_suffix: str, system: str | None, max_length: int
) -> tuple[list[tuple[list[int], int]], int]:
    """(prompt + target + EOS token ids, prompt length) per kept sample, and how many were
    longer than ``max_length`` (dropped, never truncated). Every SFT stage tokenises here."""
    if not examples:
        return [], 0
    prompts = [prompt_text(tok, ex, prompt_suffix, system) for ex in examples]
    targets = [target_text(ex) for ex in examples]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tok(targets, add_special_tokens=False)["input_ids"]
    kept, dropped = [], 0
    for p, t in zip(prompt_ids, target_ids, strict=True):
        ids = p + t + [tok.eos_token_id]
        if len(ids) > max_length:
            dropped += 1
            continue
        kept.append((ids, len(p)))
    return kept, dropped


def encode_splits(encode, source, train: list[Example], held: list[Example], data):
    """The training and the held-out samples, each with how many were longer than
    ``data.max_length`` (dropped): ``encode`` is ``encode_examples`` (``source``: the model) or
    ``tokenize_samples`` (the tokenizer). None left to train on is an error that says how to fix
    it."""
    prompt = (data.prompt_suffix, data.system, data.max_length)
    samples, dropped = encode(source, train, *prompt)
    held_samples, held_dropped = encode(source, held, *prompt)
    if not samples:
        raise MemgenError(
            f"All {dropped} training samples are longer than data.max_length={data.max_length} "
            "tokens; raise it with --set data.max_length=N."
        )
    return samples, dropped, held_samples, held_dropped


def draw_points(candidates: list[int], schedule: str, cap: int, key: tuple) -> list[int]:
    """The schedule's points among ``candidates``; a random schedule draws from ``key`` (seed,
    epoch, sample index, ...), so that a resumed run draws the same."""
    gen = None
    if schedule in ("random", "subsets"):
        gen = torch.Generator().manual_seed(hash(key) % 2**62)
    return select_points(candidates, schedule, cap, gen)


class SFTCollator:
    """Right-pads a list of ``Encoded`` into the keyword arguments of the training forward.

    ``memory=False`` gives no insertion points at all (the plain reasoner's loss).
    """

    def __init__(
        self,
        pad_id: int,
        schedule: str = "first",
        cap: int = 5,
        prompt_insertion: bool = True,
        seed: int = 0,
        memory: bool = True,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
        self.pad_id, self.schedule, self.cap = pad_id, schedule, cap
        self.prompt_insertion, self.seed, self.memory = prompt_insertion, seed, memory
        self.epoch = 0  # set by the trainer callback at each epoch start (random schedule)

    def points(self, item: Encoded) -> list[int]:
        if not self.memory:
            return []
        return draw_points(
            item.candidates, self.schedule, self.cap, (self.seed, self.epoch, item.index)
        )

    def __call__(self, items: list[Encoded | Mapping]) -> dict:
        # The trainer's dataset holds plain dicts (so its length-grouped sampler can read
        # ``input_ids``); held-out evaluation passes Encoded directly.
        items = [Encoded(**it) if isinstance(it, Mapping) else it for it in items]
        length = max(len(it.input_ids) for it in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for b, it in enumerate(items):
            n = len(it.input_ids)
            ids[b, :n] = torch.tensor(it.input_ids)
            mask[b, :n] = 1
            labels[b, it.prompt_len : n] = ids[b, it.prompt_len : n]
        use_prompt = self.memory and self.prompt_insertion
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "prompt_points": [it.prompt_len - 1 for it in items] if use_prompt else None,
            "inference_points": [self.points(it) for it in items],
        }


def heldout_loss(
    model: MemGenModel, samples: list[Encoded], collate: SFTCollator, batch: int
) -> float:
    """Token-weighted loss over held-out samples, with the collator's insertion points."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            b = collate(samples[i : i + batch])
            b = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in b.items()}
            points = Points(b["prompt_points"], b["inference_points"])
            out = weave_forward(model, b["input_ids"], b["attention_mask"], b["labels"], points)
            total += float(out.loss) * out.num_tokens
            count += out.num_tokens
    model.train(was_training)
    return total / max(count, 1)
