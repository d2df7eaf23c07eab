"""``_Run``: the state of one batched generation, the numbered steps of ``memgen_cli.generation``'s
docstring (prefill, feed, ask the trigger, weave and insert), and the helpers it groups weaver
passes and merges per-row weaver caches with."""

from __future__ import annotations

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.generation.sampling import _eos_ids
from memgen_cli.generation.trace import Insertion, Skip
from memgen_cli.models.kv import (
    SlotKV,
    append_rows,
    append_slots,
    free_slots,
    growing_cache,
    reusable,
    take_rows,
    write_rows,
    write_slots,
)
from memgen_cli.models.latents import chunk_mask, latent_positions, positions_from_mask
from memgen_cli.models.memgen import MemGenModel, WeaverCache


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
        # Rows that weave again after they stop (an episode's next turn): keep what they read.
        self.resumes = torch.zeros_like(self.active)
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
        if self.memory and not self.model.reads_cache:  # a weaver that reads the cache needs none
            self.pieces.append((embeds, mask, positions))

    def _feed(self, embeds, chunk, positions, slots=None) -> torch.Tensor:
        """Append a chunk to the reasoner's cache; return its last hidden state (B, D).
        ``slots``: the chunk's kv-prefix rows when it is latents (``reasoner_hidden``)."""
        self.mask = torch.cat([self.mask, chunk], dim=1)
        hidden = self.model.reasoner_hidden(embeds, self.mask, positions, self.cache, slots)
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
            if (self.active[r] and (self.left[r] > 0 or self.due[r])) or self.resumes[r]
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

    def _weave_on_cache(self, kind: str, index: list[int]):
        """``memory.weaver_reads: cache``: the rows' query latents read the reasoner's own cache
        (a copy of their rows, unless every row weaves), in one pass over K positions; (memory
        of those rows, their states (len(index), K, D))."""
        rows = torch.tensor(index, device=self.mask.device)
        cache = self.cache
        if len(index) < self.batch:
            cache = take_rows(self.cache, self.model.reasoner.config, rows)
        return self.model.weave_on_cache(kind, cache, self.mask[rows], self.next_pos[rows])

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

    def _insert(self, latents: torch.Tensor, rows: torch.Tensor, kind: str) -> None:
        """Append K latents of ``rows`` to the reasoner's cache (masked slots for the others).

        Only the weaving rows run through the reasoner (a copy of their cache rows). Their
        chunk goes into masked columns they already have, or into K new columns where the
        other rows get zero slots, which their mask hides.
        """
        k = latents.shape[1]
        index = rows.nonzero().flatten()
        positions = latent_positions(self.next_pos, k)
        slots = self.model.weaver.prefix_rows(kind, k).to(positions.device)
        if len(index) == self.batch:
            hidden = self._feed(latents, chunk_mask(rows, k), positions, slots.expand_as(positions))
        else:
            part = take_rows(self.cache, self.model.reasoner.config, index)
            sub_mask = torch.cat([self.mask[index], self.mask.new_ones(len(index), k)], dim=1)
            hidden = self.model.reasoner_hidden(
                latents[index], sub_mask, positions[index], part, slots.expand(len(index), k)
            )
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
        self.chosen, self.emitted, self.due, self.resumes = (
            self.chosen[index],
            self.emitted[index],
            self.due[index],
            self.resumes[index],
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
        first = all(c is None for c in self.weaver_caches)  # a run's prompt; not a later turn's
        if self.model.reads_cache:
            memory, states = self._weave_on_cache(kind, index)
            where = torch.tensor(index, device=rows.device)
            states = self._scatter(states, where)
            memory = memory if self.kv else self._scatter(memory, where)
        elif kind == "prompt" and first and len(index) == self.batch:
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
                if self.kv and not ins.inserted and not self.model.reads_cache:
                    self._unweave(ins.row, k)
        if rows.any() and self.kv:
            kept = torch.tensor([i for i, r in enumerate(index) if rows[r]], device=rows.device)
            self._insert_kv(memory.select(kept), rows)
        elif rows.any():
            self._insert(latents, rows, kind)
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
