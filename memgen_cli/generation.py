"""Weave-aware generation: a batched state machine over tensors that keeps every KV cache.

Per step, for all rows at once (see ``_Run``):
  1. choose the next token from the current logits (greedy, or temperature + top-p);
  2. feed it to the reasoner (one cached position) and remember it as weaver context;
  3. rows whose token ends a clause, with insertions left, ask the trigger;
  4. each invoking row's weaver reads the context that row has not read yet (its own cache)
     and writes K latents; only those rows run the K-position chunk through the reasoner (a
     sub-batch of their cache rows), and the chunk goes back into the batch cache, into K
     masked columns of each invoking row where it has them (``kv.write_rows``), else into K
     new columns masked for the rows that did not invoke, so the batch stays rectangular
     without growing by K for every row's every insertion; invoking rows take the logits
     after their latents, and their text positions shift by K.
With ``memory.inject: kv`` step 4 runs no reasoner chunk: the weaver's keys and values at the
K slots are written straight into those columns of the reasoner's cache (``kv.write_slots`` /
``append_slots``, at the positions the weaver computed them at), and the row's next logits are
still the boundary token's (memory changes the tokens after it). The weaver keeps its query
slots in its own cache (earlier memory is what it reads), so nothing woven is re-read as
context.
An invoking row's weave may wait one step (``_Run.DEFER``) to share the weaver pass and the
latent chunk with the next step's; a waiting row picks no token meanwhile, so nothing changes
but the number of passes.
Prompt latents are woven once, right after the prompt (where the assistant turn begins).
With ``repeat=G`` (GRPO rollouts) each prompt is prefilled and woven once, then its caches are
copied to G rows, instead of running G copies of the prompt as TRL's sampler does.

``reference_generate`` is the slow path the official code takes: one row at a time, and the
reasoner and the weaver recompute the whole sequence at every step. Tests check that both
paths give identical greedy tokens and next-token logits within 1e-4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from memgen_cli.config import MEMORY_MODES, GenerationConfig
from memgen_cli.models.kv import (
    SlotKV,
    append_rows,
    append_slots,
    check_positions,
    free_slots,
    growing_cache,
    reusable,
    take_rows,
    write_rows,
    write_slots,
)
from memgen_cli.models.latents import chunk_mask, latent_positions, positions_from_mask
from memgen_cli.models.memgen import MemGenModel, WeaverCache


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


def check_mode(model: MemGenModel | None, mode: str) -> None:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {MEMORY_MODES}, not {mode}")


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        keep[..., 0] = True  # the top token always stays (top_p 0: nothing else would)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return sample(probs, generator)


def sample(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), drawn with probability proportional to it.

    Inverse CDF with one uniform per row: ``torch.multinomial``'s CPU kernel took 37 ms a step
    for 32 rows of SmolLM2's 49k vocabulary (6 % of a 128-token rollout), this takes 2. With
    ``right=True`` the index i has cdf[i-1] <= u < cdf[i], so a zero-probability entry (an
    empty interval) is never drawn, and u stays below the total.

    >>> sample(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]), torch.Generator().manual_seed(0))
    tensor([1, 2])
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def _eos_ids(tokenizer) -> torch.Tensor:
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    return torch.tensor(sorted(i for i in ids if i is not None))


def encode_prompts(tokenizer, prompts: list[list[dict]] | list[str], device) -> dict:
    """Chat-format prompts with the tokenizer's own template, left-padded into a batch."""
    texts = [
        p
        if isinstance(p, str)
        else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


class _Run:
    """State of one batched generation (the numbered steps are in the module docstring)."""

    def __init__(
        self,
        model: MemGenModel,
        input_ids,
        attention_mask,
        cfg: GenerationConfig,
        keep=None,
        decide=None,
    ):
        self.model, self.cfg, self.keep, self.decide = model, cfg, keep, decide
        self.skips: list[Skip] = []
        self.memory = cfg.memory != "off"
        self.batch = input_ids.shape[0]
        device = input_ids.device
        self.cache = growing_cache(model.reasoner.config)
        self.mask = attention_mask
        self.next_pos = positions_from_mask(attention_mask)[:, -1] + 1
        self.left = torch.full((self.batch,), model.cfg.max_inference_insertions, device=device)
        self.active = torch.ones(self.batch, dtype=torch.bool, device=device)
        self.chosen = torch.zeros(self.batch, dtype=torch.long, device=device)  # tokens picked
        self.emitted = torch.zeros_like(self.chosen)  # tokens fed (a row's last is not)
        # Rows whose weave waits a step (see ``step``), and their trigger probabilities.
        self.due = torch.zeros_like(self.active)
        self.due_probs: torch.Tensor | None = None
        # What the reasoner has read, as (embeds, mask, positions) pieces for the whole batch;
        # row r's weaver has read pieces[: read[r] - dropped]. Rows weave at different steps,
        # so each row has its own weaver cache, made on its first weave.
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.dropped = 0  # pieces every row has read, already discarded
        self.read = [0] * self.batch
        self.weaver_caches: list[WeaverCache | None] = [None] * self.batch
        self.eos = _eos_ids(model.tokenizer).to(device)
        self.reuse = reusable(model.reasoner.config)  # latents may fill masked columns
        self.kv = model.kv  # memory.inject kv: slots' keys and values go straight to the cache
        embeds = model.embed(input_ids)
        positions = positions_from_mask(attention_mask)
        hidden = model.reasoner_hidden(embeds, attention_mask, positions, self.cache)
        # The reasoner's last hidden state per row; logits come from it once per step, so rows
        # that took latents this step share the step's one LM-head pass (SmolLM2's head is a
        # fifth of its weights: one pass per weaving event was 1.3 % of a rollout).
        self.last = hidden[:, -1]
        self._remember(embeds, attention_mask, positions)

    def _remember(self, embeds, mask, positions) -> None:
        if self.memory:
            self.pieces.append((embeds, mask, positions))

    def _feed(self, embeds, chunk, positions) -> torch.Tensor:
        """Append a chunk to the reasoner's cache; return its last hidden state (B, D)."""
        self.mask = torch.cat([self.mask, chunk], dim=1)
        hidden = self.model.reasoner_hidden(embeds, self.mask, positions, self.cache)
        self._remember(embeds, chunk, positions)
        return hidden[:, -1]

    def _unread(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What row ``row``'s weaver has not read yet, masked slots dropped: (1, T, ...)."""
        parts = self.pieces[self.read[row] - self.dropped :]
        embeds, mask, positions = (
            torch.cat([part[row] for part in kind]) for kind in zip(*parts, strict=True)
        )
        real = mask.bool()
        self.read[row] = self.dropped + len(self.pieces)
        return embeds[real][None], mask[real][None], positions[real][None]

    def _forget_read(self) -> None:
        """Drop the pieces that no row that may still weave has left to read."""
        waiting = [
            self.read[r]
            for r in range(self.batch)
            if self.active[r] and (self.left[r] > 0 or self.due[r])
        ]
        done = min(waiting, default=self.dropped + len(self.pieces)) - self.dropped
        del self.pieces[:done]
        self.dropped += done

    def _weave_all(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The first weave of a run (the prompt): every row at once, then one cache per row."""
        ctx, ctx_mask, ctx_pos = (
            torch.cat(parts, dim=1) for parts in zip(*self.pieces, strict=True)
        )
        state = WeaverCache(growing_cache(self.model.weaver_lm.config))
        memory, states = self._weaver(kind, ctx, ctx_mask, ctx_pos, state, self.next_pos)
        self._split_weaver_cache(state, list(range(self.batch)))
        self.read = [self.dropped + len(self.pieces)] * self.batch
        return memory, states

    def _weaver(self, kind, ctx, ctx_mask, ctx_pos, state, start):
        """One weave: (latents (B, K, D), states) or, with kv, (SlotKV, states)."""
        weave = self.model.weave_kv if self.kv else self.model.weave
        return weave(kind, ctx, ctx_mask, ctx_pos, state, start)

    def _split_weaver_cache(self, state: WeaverCache, index: list[int]) -> None:
        """Row i of a batch weaver cache becomes row ``index[i]``'s own, masked slots dropped."""
        config = self.model.weaver_lm.config
        for i, r in enumerate(index):
            real = state.mask[i].bool()
            rows = torch.tensor([i], device=real.device)
            self.weaver_caches[r] = WeaverCache(
                take_rows(state.cache, config, rows, real), state.mask[i : i + 1, real]
            )

    def _weave_rows(self, kind: str, index: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The weaves of every row in ``index`` at this step, in as few weaver passes as pay.

        Rows whose unread context is about as long run together: each row's cache and context
        are right-padded to the group's longest with masked slots (positions are explicit, so
        padding changes nothing), run as one pass, and split back into one cache per row
        without the padding. ``pass_groups`` trades a pass's fixed cost against padding.
        """
        unread = [self._unread(r) for r in index]
        k = self.model.weaver.num_latents(kind)
        woven = {}
        for group in pass_groups([u[0].shape[1] + k for u in unread], PASS_COST):
            rows = [index[i] for i in group]
            passed = self._weave_pass(kind, rows, [unread[i] for i in group])
            woven.update(zip(rows, passed, strict=True))
        return [woven[r] for r in index]

    def _weave_pass(self, kind: str, index: list[int], unread) -> list[tuple]:
        """One weaver pass over rows ``index`` with their unread contexts; (latents, states)."""
        config = self.model.weaver_lm.config
        if len(index) == 1:  # its own cache, nothing to pad
            row = index[0]
            if self.weaver_caches[row] is None:
                self.weaver_caches[row] = WeaverCache(growing_cache(config))
            start = self.next_pos[row : row + 1]
            memory, states = self._weaver(kind, *unread[0], self.weaver_caches[row], start)
            return [(_row(memory, 0), states[0])]
        ctx, ctx_mask, ctx_pos = (
            torch.cat([_pad_right(t, max(u[0].shape[1] for u in unread)) for t in kind_parts])
            for kind_parts in zip(*unread, strict=True)
        )
        caches = [self.weaver_caches[r] for r in index]
        state = _merge_weaver_caches(caches, WeaverCache(growing_cache(config)), config, ctx_mask)
        start = self.next_pos[index]
        memory, states = self._weaver(kind, ctx, ctx_mask, ctx_pos, state, start)
        self._split_weaver_cache(state, index)
        return [(_row(memory, i), states[i]) for i in range(len(index))]

    def _insert(self, latents: torch.Tensor, rows: torch.Tensor) -> None:
        """Append K latents of ``rows`` to the reasoner's cache (masked slots for the others).

        Only the weaving rows run through the reasoner (a copy of their cache rows). Their
        chunk goes into masked columns they already have, or into K new columns where the
        other rows get zero slots, which their mask hides.
        """
        k = latents.shape[1]
        index = rows.nonzero().flatten()
        positions = latent_positions(self.next_pos, k)
        if len(index) == self.batch:
            hidden = self._feed(latents, chunk_mask(rows, k), positions)
        else:
            part = take_rows(self.cache, self.model.reasoner.config, index)
            sub_mask = torch.cat([self.mask[index], self.mask.new_ones(len(index), k)], dim=1)
            hidden = self.model.reasoner_hidden(latents[index], sub_mask, positions[index], part)
            hidden = hidden[:, -1]
            cols = free_slots(self.mask, index, k) if self.reuse else None
            if cols is None:
                append_rows(self.cache, part, index, k)
                self.mask = torch.cat([self.mask, chunk_mask(rows, k)], dim=1)
            else:
                write_rows(self.cache, part, index, cols)
                self.mask = self.mask.index_put((index[:, None], cols), self.mask.new_ones(()))
            self._remember(latents * rows[:, None, None], chunk_mask(rows, k), positions)
        self.last = self.last.index_copy(0, index, hidden)  # rows of index
        self.next_pos = self.next_pos + rows.long() * k

    def _insert_kv(self, slots: SlotKV, rows: torch.Tensor) -> None:
        """Write K memory slots of ``rows`` (``slots`` holds those rows, in order) into the
        reasoner's cache at positions ``next_pos`` ... + K - 1: into masked columns the rows
        already have, else K new columns, masked for the others. The reasoner runs nothing."""
        k = slots.positions.shape[1]
        index = rows.nonzero().flatten()
        positions = latent_positions(self.next_pos[index], k)
        cols = free_slots(self.mask, index, k) if self.reuse else None
        if cols is None:
            append_slots(self.cache, slots, index, positions, self.batch)
            self.mask = torch.cat([self.mask, chunk_mask(rows, k)], dim=1)
        else:
            write_slots(self.cache, slots, index, cols, positions)
            self.mask = self.mask.index_put((index[:, None], cols), self.mask.new_ones(()))
        self.next_pos = self.next_pos + rows.long() * k

    def _unweave(self, row: int, k: int) -> None:
        """Drop row ``row``'s last K weaver slots (kv: a woven memory that was not inserted)."""
        state = self.weaver_caches[row]
        state.cache.crop(-k)
        state.mask = state.mask[:, : state.mask.shape[1] - k]

    def repeat_rows(self, g: int) -> None:
        """Copy every row's state (caches, masks, positions, hidden) to ``g`` adjacent rows."""
        index = torch.arange(self.batch, device=self.mask.device).repeat_interleave(g)
        self.cache = take_rows(self.cache, self.model.reasoner.config, index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.left, self.active, self.last = (
            self.left[index],
            self.active[index],
            self.last[index],
        )
        self.chosen, self.emitted, self.due = (
            self.chosen[index],
            self.emitted[index],
            self.due[index],
        )
        self.pieces = [tuple(t[index] for t in piece) for piece in self.pieces]
        self.read = [self.read[r] for r in index.tolist()]
        one, config = torch.zeros(1, dtype=torch.long), self.model.weaver_lm.config
        self.weaver_caches = [
            None if c is None else WeaverCache(take_rows(c.cache, config, one), c.mask.clone())
            for c in (self.weaver_caches[r] for r in index.tolist())
        ]
        self.batch *= g

    def _scatter(self, values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Rows ``where`` of a (B, ...) tensor set to ``values``, zeros elsewhere."""
        return values.new_zeros(self.batch, *values.shape[1:]).index_copy(0, where, values)

    def weave(self, kind: str, rows: torch.Tensor, probs: torch.Tensor | None) -> list[Insertion]:
        """Weave K latents for ``rows`` and append them to the reasoner's cache."""
        if self.model.weaver.num_latents(kind) == 0:
            return []  # K = 0 turns this kind of insertion off
        index = rows.nonzero().flatten().tolist()
        k = self.model.weaver.num_latents(kind)
        if kind == "prompt":  # every row weaves: ``index`` is every row
            memory, states = self._weave_all(kind)
        else:
            woven = self._weave_rows(kind, index)
            where = torch.tensor(index, device=rows.device)
            memory, states = zip(*woven, strict=True)
            states = self._scatter(torch.stack(states), where)
            memory = SlotKV.cat(memory) if self.kv else self._scatter(torch.stack(memory), where)
        latents = states.new_zeros(self.batch, k, 0) if self.kv else memory
        events = [
            Insertion(
                row=r,
                token_index=int(self.emitted[r]),
                kind=kind,
                trigger_prob=None if probs is None else float(probs[r]),
                latents=latents[r].detach().float().cpu(),
                weaver_states=states[r].detach().float().cpu(),
            )
            for r in index
        ]
        if self.keep is not None:
            for ins in events:
                ins.inserted = bool(self.keep(ins))
                rows[ins.row] = ins.inserted
                if self.kv and not ins.inserted:
                    self._unweave(ins.row, k)
        if rows.any() and self.kv:
            kept = torch.tensor([i for i, r in enumerate(index) if rows[r]], device=rows.device)
            self._insert_kv(memory.select(kept), rows)
        elif rows.any():
            self._insert(latents, rows)
        self._forget_read()
        return events

    # A clause boundary's weave may wait one step, to run in one weaver pass and one latent
    # chunk with the next step's (each pass streams every weight once: a 1-row pass costs a
    # third of a 32-row decode step on the 2-core CPU). Waiting changes no result: a waiting
    # row picks no token and its decode column is masked. Tests compare both schedules.
    DEFER = True

    def step(self, token: torch.Tensor, feed: torch.Tensor) -> list[Insertion]:
        """Feed the tokens of rows ``feed``; weave where a row ends a clause and its trigger
        invokes, now or together with the next step's (``DEFER``)."""
        if feed.any():
            hidden = self._feed(
                self.model.embed(token[:, None]), feed.long()[:, None], self.next_pos[:, None]
            )
            self.emitted = self.emitted + feed.long()
            self.next_pos = self.next_pos + feed.long()
            self.last = torch.where(feed[:, None], hidden, self.last)
        if not self.memory:
            return []
        invoke, probs = torch.zeros_like(feed), None
        eligible = feed & self.model.delimiters[token] & (self.left > 0)
        if eligible.any():
            invoke, probs = self._decide(hidden, eligible, token)
            self.left = self.left - invoke.long()
        due = self.due
        if not (invoke.any() or due.any()):
            return []
        others = self.active & ~(due | invoke)  # rows that pick a token next step
        if self.DEFER and not due.any() and others.any():
            self.due, self.due_probs = invoke, probs  # wait for the next step's weaves
            return []
        if self.due_probs is not None:
            probs = self.due_probs if probs is None else torch.where(due, self.due_probs, probs)
        self.due, self.due_probs = torch.zeros_like(due), None
        return self.weave("inference", invoke | due, probs)

    def _decide(self, hidden, eligible, token) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which eligible rows invoke the weaver, and the trained trigger's probabilities."""
        trigger = self.model.trigger
        probs = trigger.probability(hidden) if trigger.is_trained else None
        invoke = eligible
        if self.decide is not None:  # trigger RL: sampled decisions (training/trigger_rl.py)
            invoke = self.decide(hidden, eligible, token, self.emitted)
        elif self.cfg.memory == "full" and probs is not None:
            invoke = eligible & (probs >= self.model.cfg.trigger_threshold)
        if probs is not None and self.cfg.memory == "full":
            for r in (eligible & ~invoke).nonzero().flatten().tolist():
                self.skips.append(Skip(r, int(self.emitted[r]), float(probs[r])))
        return invoke, probs


def _row(memory, i: int):
    """Row ``i`` of a weave's memory: a latent tensor's (K, D), or a one-row SlotKV."""
    if isinstance(memory, SlotKV):
        return memory.select(torch.tensor([i], device=memory.positions.device))
    return memory[i]


# A pass's fixed cost in positions: streaming every weight once costs about what 16 more
# positions do (2-core CPU, SmolLM2-135M: a 1x1 pass 47 ms, each further position ~2.5-3 ms).
PASS_COST = 16


def pass_groups(lengths: list[int], fixed: int) -> list[list[int]]:
    """Indices of ``lengths`` in groups, one pass each, that minimise the total cost, a group
    costing ``fixed`` + rows x its longest length (padding included): groups are runs of the
    sorted lengths, found by dynamic programming over where each run ends.

    >>> pass_groups([40, 3, 5, 38], fixed=16)
    [[1, 2], [3, 0]]
    >>> pass_groups([40, 3, 5, 38], fixed=200)
    [[1, 2, 3, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + fixed + (end - start) * lengths[order[end - 1]]
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def _pad_right(t: torch.Tensor, length: int) -> torch.Tensor:
    """(1, T, ...) -> (1, length, ...) with zeros after the T real entries."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)


def _merge_weaver_caches(
    caches: list[WeaverCache | None], empty: WeaverCache, config, like: torch.Tensor
) -> WeaverCache:
    """One batch cache from single-row weaver caches, right-padded with masked slots."""
    lengths = [0 if c is None or c.mask is None else c.mask.shape[1] for c in caches]
    longest = max(lengths)
    if longest == 0:
        return empty
    ref = next(c for c, n in zip(caches, lengths, strict=True) if n)
    merged = growing_cache(config)
    for layer, ref_layer in enumerate(ref.cache.layers):
        keys, values = [], []
        for c, n in zip(caches, lengths, strict=True):
            if n:
                k, v = c.cache.layers[layer].keys, c.cache.layers[layer].values
            else:
                k = ref_layer.keys.new_zeros(1, ref_layer.keys.shape[1], 0, ref_layer.keys.shape[3])
                v = ref_layer.values.new_zeros(
                    1, ref_layer.values.shape[1], 0, ref_layer.values.shape[3]
                )
            keys.append(_pad_right(k.transpose(1, 2), longest).transpose(1, 2))
            values.append(_pad_right(v.transpose(1, 2), longest).transpose(1, 2))
        merged.update(torch.cat(keys), torch.cat(values), layer)
    mask = torch.cat(
        [
            _pad_right(c.mask if n else like.new_zeros(1, 0), longest)
            for c, n in zip(caches, lengths, strict=True)
        ]
    )
    return WeaverCache(merged, mask)


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
    run.active &= cfg.max_new_tokens > 0
    while run.active.any():
        ready = run.active & ~run.due  # rows whose weave waits pick no token this step
        logits = model.lm_head(run.last)
        if keep_logits:
            step_logits.append(logits)
        token = _pick(logits, cfg, generator)
        if keep_logprobs:
            scaled = logits / (cfg.temperature if cfg.temperature > 0 else 1.0)
            logprobs.append(scaled.log_softmax(-1).gather(1, token[:, None])[:, 0])
        token = torch.where(ready, token, run.eos[0])
        tokens.append(token)
        picked.append(ready)
        run.chosen = run.chosen + ready.long()
        if not cfg.ignore_eos:
            run.active = run.active & ~(ready & torch.isin(token, run.eos))
        run.active = run.active & (run.chosen < cfg.max_new_tokens)  # a row's last is not fed
        inserted = run.step(token, ready & run.active) if run.active.any() else []
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


def generate(
    model: MemGenModel,
    input_ids,
    attention_mask,
    cfg: GenerationConfig,
    keep_logits=False,
    keep=None,
    repeat: int = 1,
    keep_logprobs=False,
    decide=None,
):
    """Run ``iter_generate`` to the end and return its GenerationOutput."""
    *_, result = iter_generate(
        model, input_ids, attention_mask, cfg, keep_logits, keep, repeat, keep_logprobs, decide
    )
    return result


# ------------------------------------------------------------------------- reference path
@torch.no_grad()
def reference_generate(model: MemGenModel, input_ids, attention_mask, cfg: GenerationConfig):
    """The slow path: per row, no caches, everything recomputed at every step (greedy only)."""
    check_mode(model, cfg.memory)
    if cfg.temperature > 0:
        raise ValueError("the reference path is greedy only")
    model.eval()
    eos = set() if cfg.ignore_eos else set(_eos_ids(model.tokenizer).tolist())
    tokens, finished, logits_rows, trace = [], [], [], MemoryTrace()
    for row in range(input_ids.shape[0]):
        ids = input_ids[row, attention_mask[row].bool()][None]
        row_tokens, row_logits, done = _reference_row(model, ids, cfg, eos, row, trace)
        tokens.append(row_tokens)
        finished.append(done)
        logits_rows.append(row_logits)
    return GenerationOutput(tokens, trace, finished, logits_rows)


def _reference_row(model: MemGenModel, ids, cfg, eos, row, trace):
    stream = (_KVStream if model.kv else _InputStream)(model, ids)

    def weave(kind, index, prob):
        if model.weaver.num_latents(kind) == 0:
            return
        latents, states = stream.weave(kind)
        trace.insertions.append(Insertion(row, index, kind, prob, latents, states))

    memory = cfg.memory != "off"
    if memory:
        weave("prompt", 0, None)
    left = model.cfg.max_inference_insertions
    out, logits_per_step = [], []
    for step in range(cfg.max_new_tokens):
        logits = model.lm_head(stream.hidden())[0]
        logits_per_step.append(logits)
        token = int(logits.argmax())
        out.append(token)
        if token in eos:
            return out[:-1], logits_per_step, True
        stream.append(token)
        if memory and step + 1 < cfg.max_new_tokens and model.delimiters[token] and left > 0:
            trig = model.trigger
            prob = float(trig.probability(stream.hidden())[0]) if trig.is_trained else None
            if cfg.memory == "weaver" or prob is None or prob >= model.cfg.trigger_threshold:
                left -= 1
                weave("inference", len(out), prob)
    return out, logits_per_step, False


def _ones_and_positions(n: int, device, start: int = 0):
    mask = torch.ones(1, start + n, dtype=torch.long, device=device)
    return mask, torch.arange(start, start + n, device=device)[None]


class _InputStream:
    """The reference's reasoner input: every input embedding so far, latents included."""

    def __init__(self, model: MemGenModel, ids):
        self.model, self.x = model, model.embed(ids)  # (1, T, D)

    def hidden(self) -> torch.Tensor:
        """The reasoner over the whole stream, from scratch: the last hidden state (1, D)."""
        mask, pos = _ones_and_positions(self.x.shape[1], self.x.device)
        return self.model.reasoner_hidden(self.x, mask, pos)[:, -1]

    def append(self, token: int) -> None:
        self.x = torch.cat(
            [self.x, self.model.embed(torch.tensor([[token]], device=self.x.device))], 1
        )

    def weave(self, kind: str):
        """The weaver re-reads the whole prefix from an empty cache; K latents join the stream."""
        mask, pos = _ones_and_positions(self.x.shape[1], self.x.device)
        start = torch.tensor([self.x.shape[1]], device=self.x.device)
        latents, states = self.model.weave(
            kind, self.x, mask, pos, self.model.new_weaver_cache(), start
        )
        self.x = torch.cat([self.x, latents], dim=1)
        return latents[0].float().cpu(), states[0].cpu()


class _KVStream:
    """The reference's stream with ``memory.inject: kv``: token embeddings and, between them,
    the memory slots' keys and values; the weaver's own input has the query latents there."""

    def __init__(self, model: MemGenModel, ids):
        self.model = model
        self.seen = model.embed(ids)  # the weaver's input: tokens, query latents at the slots
        self.parts: list = [self.seen]  # the reasoner's: token embeddings (1, n, D) and SlotKVs

    def hidden(self) -> torch.Tensor:
        """The reasoner from scratch, part by part: token segments run through it, memory slots
        appended to its (ordinary) cache between them; the last token's hidden state (1, D)."""
        cache = DynamicCache(config=self.model.reasoner.config)
        length, hidden = 0, None
        for part in self.parts:
            if isinstance(part, SlotKV):
                k = part.positions.shape[1]
                check_positions(
                    part, latent_positions(torch.tensor([length]), k).to(part.positions)
                )
                for layer, (keys, values) in enumerate(zip(part.keys, part.values, strict=True)):
                    cache.update(keys, values, layer)
                length += k
                continue
            mask, pos = _ones_and_positions(part.shape[1], part.device, length)
            hidden = self.model.reasoner_hidden(part, mask, pos, cache)[:, -1]
            length += part.shape[1]
        return hidden

    def append(self, token: int) -> None:
        embed = self.model.embed(torch.tensor([[token]], device=self.seen.device))
        self.seen = torch.cat([self.seen, embed], 1)
        self.parts.append(embed)

    def weave(self, kind: str):
        """The weaver re-reads the whole prefix (tokens and earlier queries) from an empty
        cache; its keys and values at the K query positions join the reasoner's parts."""
        n = self.seen.shape[1]
        mask, pos = _ones_and_positions(n, self.seen.device)
        start = torch.tensor([n], device=self.seen.device)
        slots, states = self.model.weave_kv(
            kind, self.seen, mask, pos, self.model.new_weaver_cache(), start
        )
        queries = self.model.weaver.query_embeds(kind, 1).to(self.seen.dtype)
        self.seen = torch.cat([self.seen, queries], 1)
        self.parts.append(slots)
        return states.new_zeros(queries.shape[1], 0).cpu(), states[0].cpu()
