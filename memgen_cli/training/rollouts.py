"""GRPO rollouts with woven latents, and the policy's log-probs of them for the loss.

``rollout``: G sampled completions per prompt from the cached weave-aware generation, which
prefills and weaves each prompt once and copies its caches to the G rows (``repeat=G``).
Per row it keeps the sampled tokens (the stop token included: the policy chose it too), the
log-prob of each under softmax(logits / temperature) at sampling time, and the trace's
*exact* insertion points.

``policy_inputs`` + ``policy_logprobs``: the same tokens scored by the batched training
forward (``weave_hidden``) with latents at exactly those points (never re-derived from the
text, so this stays right when a trigger decides), at the sampling temperature; gradients
reach the weaver only. Where no parameter changed since sampling both log-probs agree to
float error: ``logp_diff`` reports the gap every step (tests require < 1e-4 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.generation import GenerationOutput, encode_prompts, generate
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import Points, weave_hidden

ENTROPY_CHUNK = 256  # completion tokens per entropy computation


@dataclass
class Rollouts:
    """G completions per prompt, rows ``p*G .. p*G+G-1`` answering prompt p."""

    group_size: int
    prompt_ids: list[list[int]]  # per row, unpadded
    completion_ids: list[list[int]]  # per row, the stop token included when finished
    logprobs: list[list[float]]  # sampling-time log-prob of each completion id
    finished: list[bool]  # stopped by a stop token (vs. cut at max_new_tokens)
    prompt_insertion: bool  # every row has latents after its prompt
    inference_points: list[list[int]]  # per row: completion tokens before each insertion

    @property
    def texts_ids(self) -> list[list[int]]:
        """Completion ids without the stop token (what the reward reads)."""
        return [
            ids[:-1] if done else ids
            for ids, done in zip(self.completion_ids, self.finished, strict=True)
        ]


def generate_groups(
    model: MemGenModel,
    messages: list[list[dict]],
    cfg: GenerationConfig,
    group_size: int,
    **options,
) -> tuple[dict, GenerationOutput]:
    """Each chat prompt answered ``group_size`` times (one shared prefill each): the encoded
    prompts and the generation; ``options`` go to ``generate`` (``keep_logprobs``, ``decide``)."""
    enc = encode_prompts(model.tokenizer, messages, model.device)
    out = generate(
        model, enc["input_ids"], enc["attention_mask"], cfg, repeat=group_size, **options
    )
    return enc, out


def rollout(
    model: MemGenModel, messages: list[list[dict]], cfg: GenerationConfig, group_size: int
) -> Rollouts:
    """Sample ``group_size`` completions for each chat prompt (one shared prefill each)."""
    enc, out = generate_groups(model, messages, cfg, group_size, keep_logprobs=True)
    prompts = [
        ids[m.bool()].tolist()
        for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    rows = len(out.tokens)
    kinds = [{i.kind for i in out.trace.for_row(r)} for r in range(rows)]
    return Rollouts(
        group_size=group_size,
        prompt_ids=[prompts[r // group_size] for r in range(rows)],
        completion_ids=[
            toks + ([stop] if stop is not None else [])
            for toks, stop in zip(out.tokens, out.stop_tokens, strict=True)
        ],
        logprobs=out.logprobs,
        finished=out.finished,
        prompt_insertion=bool(rows) and all("prompt" in k for k in kinds),
        inference_points=[
            [i.token_index for i in out.trace.for_row(r) if i.kind == "inference"]
            for r in range(rows)
        ],
    )


def policy_inputs(r: Rollouts, pad_id: int) -> dict:
    """Right-padded prompt + completion rows and where each completion token sits.

    ``completion_index`` (N, L) is the column of completion token j of each row (L = longest
    completion), ``completion_mask`` marks the real ones; ``sampling_logps`` is (N, L).
    An insertion after ``t`` completion tokens goes after column ``prompt_len + t - 1``.
    """
    n = len(r.completion_ids)
    lengths = [len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids, strict=True)]
    width = max(len(c) for c in r.completion_ids)
    ids = torch.full((n, max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    index = torch.zeros(n, width, dtype=torch.long)
    comp_mask = torch.zeros(n, width, dtype=torch.long)
    sampled = torch.zeros(n, width)
    for b, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids, strict=True)):
        ids[b, : lengths[b]] = torch.tensor(p + c)
        mask[b, : lengths[b]] = 1
        index[b] = (len(p) + torch.arange(width)).clamp(max=lengths[b] - 1)
        comp_mask[b, : len(c)] = 1
        sampled[b, : len(c)] = torch.tensor(r.logprobs[b], dtype=torch.float32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_index": index,
        "completion_mask": comp_mask,
        "sampling_logps": sampled,
        "prompt_points": [len(p) - 1 for p in r.prompt_ids] if r.prompt_insertion else None,
        "inference_points": [
            [len(p) + t - 1 for t in pts]
            for p, pts in zip(r.prompt_ids, r.inference_points, strict=True)
        ],
    }


def policy_logprobs(
    model: MemGenModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_index: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_points: list[int] | None,
    inference_points: list[list[int]],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N, L) of the completion tokens under the woven policy, and the entropy
    of each next-token distribution (N, L, no gradient); zeros where the mask is 0."""
    hidden = weave_hidden(model, input_ids, attention_mask, Points(prompt_points, inference_points))
    tokens = input_ids.gather(1, completion_index)
    return token_logprobs(model, hidden, completion_index, completion_mask, tokens, temperature)


def token_logprobs(
    model: MemGenModel,
    hidden: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N, L) of ``tokens`` (N, L), each predicted at column ``index - 1`` of
    ``hidden`` (``weave_hidden``'s, aligned with the tokens), and the entropy of each
    next-token distribution (no gradient); zeros where ``mask`` is 0."""
    src = (index - 1).clamp(min=0)  # hidden at i - 1 predicts token i
    picked = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
    real = mask.bool()
    logits = model.lm_head(picked[real]) / (temperature if temperature > 0 else 1.0)
    tokens = tokens[real]
    # logit - logsumexp, as TRL's selective_log_softmax: no (tokens, vocab) log-softmax is kept
    # for the backward pass, only the logits.
    chosen = logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
    with torch.no_grad():  # entropy is a metric: in chunks, never a whole second logits tensor
        parts = logits.detach().split(ENTROPY_CHUNK)
        ent = torch.cat([-(x.softmax(-1) * x.log_softmax(-1)).sum(-1) for x in parts])
    logps = torch.zeros(real.shape, dtype=chosen.dtype, device=chosen.device)
    entropy = torch.zeros_like(logps)
    return logps.masked_scatter(real, chosen), entropy.masked_scatter(real, ent)
