"""The batched, cached path: ``iter_generate`` drives a ``_Run`` step by step and streams
``StepEvent``s; ``generate`` runs it to the end."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.generation.sampling import _pick, check_mode
from memgen_cli.generation.state import _Run
from memgen_cli.generation.trace import GenerationOutput, MemoryTrace, StepEvent
from memgen_cli.models.memgen import MemGenModel


@torch.no_grad()
def iter_generate(
    model: MemGenModel,
    input_ids,
    attention_mask,
    cfg: GenerationConfig,
    keep_logits=False,
    keep=None,
    repeat: int = 1,
    keep_logprobs=False,
    decide=None,
) -> Iterator[StepEvent | GenerationOutput]:
    """Yield a StepEvent per generated token, then the GenerationOutput.

    ``keep(insertion) -> bool``, if given, may suppress a woven insertion before the reasoner
    reads it (ablations, cluster interventions); a suppressed insertion still uses up one of
    the row's insertions and is kept in the trace with ``inserted=False``.
    ``repeat=G`` answers each prompt G times (rows p*G .. p*G+G-1), sharing its prefill and
    prompt weave. ``keep_logprobs`` records the chosen tokens' log-probs (GRPO's old policy).
    """
    check_mode(model, cfg.memory)
    model.eval()
    generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
    run = _Run(model, input_ids, attention_mask, cfg, keep, decide)
    trace = MemoryTrace()
    woven = run.weave("prompt", run.active.clone(), None) if run.memory else []
    if repeat > 1:
        run.repeat_rows(repeat)
        woven = [
            dataclasses.replace(ins, row=ins.row * repeat + g)
            for ins in woven
            for g in range(repeat)
        ]
    if run.memory:
        trace.insertions += woven
        yield StepEvent(None, run.active.clone(), woven)
    tokens, picked, step_logits, logprobs = [], [], [], []
    for token, ready, inserted, logits in decode(run, generator):
        if keep_logits:
            step_logits.append(logits)
        if keep_logprobs:
            scaled = logits / (cfg.temperature if cfg.temperature > 0 else 1.0)
            logprobs.append(scaled.log_softmax(-1).gather(1, token[:, None])[:, 0])
        tokens.append(token)
        picked.append(ready)
        trace.insertions += inserted
        yield StepEvent(token, ready, inserted)
    trace.skips = run.skips
    result = _collect(tokens, picked, run, trace, step_logits if keep_logits else None)
    if keep_logprobs:
        lps = _per_row(logprobs, picked, lambda t: t.tolist()) if logprobs else [[]] * run.batch
        result.logprobs = [
            lp[: len(row) + done]
            for lp, row, done in zip(lps, result.tokens, result.finished, strict=True)
        ]
    yield result


def decode(run: _Run, generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, list, torch.Tensor]]:
    """Steps 1-4 for every active row until each has stopped (EOS, or ``max_new_tokens``
    picked): per step (tokens, rows that picked one, insertions, logits). A row whose weave
    waits picks no token that step: its entry is EOS, and ``ready`` is False there. Shared by
    ``iter_generate`` and the episode engine (one call per assistant turn)."""
    cfg = run.cfg
    run.active &= cfg.max_new_tokens > 0
    while run.active.any():
        ready = run.active & ~run.due  # rows whose weave waits pick no token this step
        logits = run.model.lm_head(run.last)
        token = torch.where(ready, _pick(logits, cfg, generator), run.eos[0])
        run.chosen = run.chosen + ready.long()
        if not cfg.ignore_eos:
            run.active = run.active & ~(ready & torch.isin(token, run.eos))
        run.active = run.active & (run.chosen < cfg.max_new_tokens)  # a row's last is not fed
        inserted = run.step(token, ready & run.active) if run.active.any() else []
        yield token, ready, inserted, logits


def _per_row(steps: list[torch.Tensor], picked: list[torch.Tensor], convert) -> list:
    """Per row, the entries of per-step (B, ...) tensors at the steps where the row picked a
    token, in order (a row whose weave waited skips that step)."""
    grid, mask = torch.stack(steps, dim=1), torch.stack(picked, dim=1)  # (B, steps, ...)
    return [convert(grid[r][mask[r]]) for r in range(grid.shape[0])]


def _collect(tokens, picked, run: _Run, trace: MemoryTrace, step_logits) -> GenerationOutput:
    grid = _per_row(tokens, picked, lambda t: t.tolist()) if tokens else [[]] * run.batch
    eos = set() if run.cfg.ignore_eos else set(run.eos.tolist())
    out, finished, stops = [], [], []
    for row in grid:
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(row if cut is None else row[:cut])
        finished.append(cut is not None)
        stops.append(None if cut is None else row[cut])
    if step_logits:  # per token index (B, V): row r's logits when it picked its i-th token
        rows = _per_row(step_logits, picked, lambda t: t)
        longest, blank = max(len(r) for r in rows), torch.zeros_like(step_logits[0][0])
        step_logits = [
            torch.stack([r[i] if i < len(r) else blank for r in rows]) for i in range(longest)
        ]
    return GenerationOutput(out, trace, finished, step_logits, stop_tokens=stops)


def generate(model: MemGenModel, input_ids, attention_mask, cfg: GenerationConfig, **options):
    """Run ``iter_generate`` (the same options, by keyword) to the end; its GenerationOutput."""
    *_, result = iter_generate(model, input_ids, attention_mask, cfg, **options)
    return result
