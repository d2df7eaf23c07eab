"""MemGen: a frozen reasoner, a memory weaver and a memory trigger, composed.

With the default shared backbone there is one copy of the weights: the weaver is a PEFT LoRA
adapter named ``weaver`` injected into the reasoner's own model, and every reasoner pass runs
with adapter layers disabled (tests/test_model.py proves it equals the plain model). A separate
weaver backbone (e.g. a smaller LM) also works; the projections then map between hidden sizes.

Adapters are *off* by default and switched on only for the duration of a weaver pass, because
reasoner passes (one per generated token) far outnumber weaver passes.

Where the memory enters the reasoner (``memory.inject``):

- ``input`` (the paper, ``weave``): the weaver's last hidden states at its K query positions,
  mapped by ``weaver_to_reasoner``, are K input embeddings; the frozen reasoner runs over them
  and makes its own keys and values at every layer.
- ``kv`` (``weave_kv``): at an insertion point p the weaver runs over the context it has not
  read plus the K query latents placed at the reasoner's own positions p ... p+K-1, and its
  keys and values at those K positions, at every layer, *are* the memory: they are written
  into the reasoner's cache at p ... p+K-1 and the reasoner never runs over those positions
  (its text continues at p+K). So the token right after an insertion is predicted from the
  boundary token's state, which precedes the memory: memory changes the second token on.
  Keys are cached after the rotary embedding, so slots must sit at exactly the positions the
  weaver computed them at (``kv.check_positions``). The weaver keeps the query slots in its
  own cache, so a later weave reads earlier memory as the reasoner does (as the weaver's keys
  and values). Needs the shared backbone (one set of layers, one head geometry; the cache is
  per KV head, so GQA works) and full attention: on a sliding-window layer memory would age
  out of the window like any old token, and that is refused rather than half supported.
  There are no projections, and the last layer's LoRA other than k_proj / v_proj gets no
  gradient (nothing reads that layer's output at the slots).

What the weaver reads the context as (``memory.weaver_reads``):

- ``context`` (the paper): the weaver runs over the context itself, its adapter on at every
  position, keeping its own cache (``WeaverCache``): a second pass over every prompt and clause.
- ``cache`` (``weave_on_cache``): the K query latents, adapter on, attend to the reasoner's own
  cached keys and values of the context (earlier memory included) and are dropped from that
  cache again, so a weave runs over K positions and nothing is read twice; the adapter acts only
  at the query positions, as Activated LoRA's does (Greenewald et al. 2025). With ``input`` the
  weaver's last states there become the latents (``weaver_to_reasoner``); with ``kv`` its keys
  and values there are the memory. Shared backbone and full attention only.

``memory.kv_prefix`` adds a learned key and value per layer and slot to what sits at the slots:
with kv to the weaver's keys and values (``add_prefix``), with input to the keys and values the
reasoner computes over the latents (``input_prefix``); either way before the rotary embedding.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import DynamicCache

from memgen_cli.config import MemoryConfig
from memgen_cli.models.compat import cache_geometry, check_inject, check_lora_targets
from memgen_cli.models.kv import SlotKV
from memgen_cli.models.latents import delimiter_table, latent_positions
from memgen_cli.models.trigger import Trigger
from memgen_cli.models.weaver import Weaver

ADAPTER = "weaver"


@dataclass
class WeaverCache:
    """The weaver's KV cache of the context it has read, and that context's 2-D mask."""

    cache: DynamicCache
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]


class MemGenModel(nn.Module):
    def __init__(self, reasoner, tokenizer, cfg: MemoryConfig, weaver_backbone=None):
        super().__init__()
        check_inject(cfg, reasoner.config, weaver_backbone is not None)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shared = weaver_backbone is None
        self.kv = cfg.inject == "kv"
        self.reads_cache = cfg.weaver_reads == "cache"
        for p in reasoner.parameters():
            p.requires_grad_(False)
        check_lora_targets(cfg.lora_targets, reasoner if self.shared else weaver_backbone)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            bias="none",
        )
        if self.shared:
            # get_peft_model injects LoRA layers into ``reasoner`` in place: one copy of weights.
            self.peft = get_peft_model(reasoner, lora, adapter_name=ADAPTER)
            self.reasoner = reasoner
        else:
            self.reasoner = reasoner
            self.peft = get_peft_model(weaver_backbone, lora, adapter_name=ADAPTER)
        self.weaver_lm = self.peft.base_model.model
        # The toggles below run twice per weaving event; walk only the LoRA layers, not every
        # module of the model as PEFT's model-wide enable/disable_adapter_layers does.
        self._lora_layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        self._lora_params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        self._weaver_trainable = True
        self._adapter_on = True
        self._set_adapter(False)
        r_hidden = reasoner.get_input_embeddings().weight.shape[1]
        w_hidden = self.weaver_lm.get_input_embeddings().weight.shape[1]
        self.weaver = Weaver(
            r_hidden,
            w_hidden,
            cfg.prompt_latents,
            cfg.inference_latents,
            cfg.projection_init,
            embedding_rms=_rms(reasoner.get_input_embeddings().weight),
            hidden_rms=1.0 if self.kv else self._final_hidden_rms(),
            neutral_embedding=None if self.kv else self._neutral_embedding(tokenizer),
            projections=not self.kv,
            reads_context=not self.reads_cache,
            prefix=cache_geometry(reasoner.config) if cfg.kv_prefix else None,
            prefix_rate=cfg.kv_prefix_rate,
        ).to(reasoner.device)
        self.trigger = Trigger(r_hidden, cfg.trigger_hidden).to(reasoner.device)
        self.trigger.requires_grad_(False)  # trained only by train-trigger, with the weaver frozen
        self.register_buffer(
            "delimiters",
            delimiter_table(tokenizer, cfg.delimiters).to(reasoner.device),
            persistent=False,
        )

    # ----------------------------------------------------------------------------- adapters
    def _set_adapter(self, on: bool) -> None:
        if not self.shared or on == self._adapter_on:
            return
        for layer in self._lora_layers:
            layer.enable_adapters(on)
        self._adapter_on = on
        # PEFT's toggles also flip requires_grad on the LoRA weights; the weaver's trainability
        # is ours to decide, and autograd must still reach LoRA after a reasoner pass.
        for p in self._lora_params:
            p.requires_grad_(self._weaver_trainable)

    @contextmanager
    def weaver_adapter(self):
        """Adapter layers on for a weaver pass (shared backbone only), off again afterwards."""
        self._set_adapter(True)
        try:
            yield
        finally:
            self._set_adapter(False)

    # ------------------------------------------------------------------------------ reasoner
    @property
    def device(self) -> torch.device:
        return self.reasoner.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.reasoner.get_input_embeddings().weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.reasoner.get_input_embeddings()(ids)

    def reasoner_hidden(
        self, embeds, mask, positions, cache=None, slots=None, adapter=None
    ) -> torch.Tensor:
        """Last-layer hidden states of the frozen reasoner (adapters off): (B, T, D).

        ``slots`` (B, T), with ``memory.kv_prefix``: each column's row of
        ``Weaver.prefix_table`` where ``embeds`` holds a memory slot (-1 elsewhere); the keys
        and values there get the learned prefix (``input_prefix``). ``adapter`` (B, T) bool:
        columns where the weaver's adapter is on in this pass (``adapter_at``)."""
        self._set_adapter(False)
        with self.input_prefix(slots), self.adapter_at(adapter):
            out = self.reasoner.get_decoder()(
                inputs_embeds=embeds.to(self.dtype),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return out.last_hidden_state

    @contextmanager
    def adapter_at(self, columns: torch.Tensor | None):
        """The weaver's adapter on at ``columns`` (B, T) of the next pass only, off elsewhere
        (``memory.weaver_reads: cache``: its query latents in the same pass as the reasoner's
        context): each adapted layer's LoRA update is multiplied by the column mask, so every
        other column gets exactly the frozen layer's output (x + 0). None: no change."""
        if columns is None or not self.shared:
            yield
            return
        scale = columns[..., None]

        def hook(module, args, out):
            return out * scale.to(out.dtype)

        handles = [
            layer.lora_B[ADAPTER].register_forward_hook(hook)
            for layer in self._lora_layers
            if ADAPTER in getattr(layer, "lora_B", {})
        ]
        self._set_adapter(True)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._set_adapter(False)

    @contextmanager
    def input_prefix(self, slots: torch.Tensor | None):
        """``memory.kv_prefix`` with ``memory.inject: input``: while the reasoner runs over
        latents, every layer's ``k_proj`` / ``v_proj`` output at the latent columns (``slots``
        >= 0, the column's prefix row) gets the learned prefix added, *before* the model's own
        rotary embedding, as ``add_prefix`` adds it to kv slots (rotated there by hand). So the
        memory writes every layer: the latents at the input, as the paper's weaver does, and a
        learned key and value per layer and slot on top (prefix tuning's parameters, at the
        memory's own slots). Forward hooks for the one call: the weaver's passes over the same
        (shared) modules never see them."""
        if (
            slots is None
            or (self.kv and not self.reads_cache)  # kv slots get theirs in add_prefix
            or self.weaver.prefix_keys is None
            or not bool((slots >= 0).any())
        ):
            yield
            return
        table_k, table_v = self.weaver.prefix_table()
        at = slots.clamp(min=0).to(table_k.device)
        on = (slots >= 0)[..., None].to(table_k.device)
        handles = []
        for layer, block in enumerate(self.reasoner.get_decoder().layers):
            attn = block.self_attn
            for proj, table in ((attn.k_proj, table_k), (attn.v_proj, table_v)):
                handles.append(proj.register_forward_hook(_adds_prefix(table[layer], at, on)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.reasoner.get_output_embeddings()(hidden).float()

    # -------------------------------------------------------------------------------- weaver
    def new_weaver_cache(self) -> WeaverCache:
        return WeaverCache(DynamicCache(config=self.weaver_lm.config))

    def _weaver_pass(self, inputs, context_mask, context_positions, state, query_start, official):
        """The weaver backbone over ``inputs`` (new context, then K queries) into ``state``'s
        cache, queries at positions ``query_start + [0, K)``; returns (output, the 2-D mask of
        everything the cache now holds)."""
        k = inputs.shape[1] - context_mask.shape[1]
        ones = torch.ones(inputs.shape[0], k, dtype=context_mask.dtype, device=context_mask.device)
        past = state.mask if state.mask is not None else context_mask[:, :0]
        mask = torch.cat([past, context_mask, ones], dim=1)
        positions = torch.cat([context_positions, latent_positions(query_start, k)], dim=1)
        backbone = self.weaver_lm if official else self.weaver_lm.get_decoder()
        with self.weaver_adapter():
            out = backbone(
                inputs_embeds=inputs,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=state.cache,
                use_cache=True,
                output_hidden_states=official,
            )
        return out, mask

    def weave(
        self,
        kind: str,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        context_positions: torch.Tensor,
        state: WeaverCache,
        query_start: torch.Tensor,
        official: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read new context into the weaver's cache and write K latents of ``kind``.

        ``context`` (B, T, D_reasoner) are reasoner input embeddings not yet seen by the weaver
        (tokens and earlier latents; T may be 0). The K query latents are run as a suffix at
        positions ``query_start + [0, K)`` and dropped from the cache afterwards, so the cache
        holds only real context. Returns (latents in reasoner space, weaver hidden states).

        ``official=True`` makes the call the official code makes (reference path only): the
        whole causal LM with ``output_hidden_states``, so vocabulary logits are computed for
        every position and thrown away. The latents are the same either way.
        """
        if self.kv or self.reads_cache:
            raise RuntimeError(
                "memory.inject is kv or memory.weaver_reads is cache: use weave_kv / weave_on_cache"
            )
        w_dtype = self.weaver_lm.get_input_embeddings().weight.dtype
        ctx = self.weaver.reasoner_to_weaver(context.float())
        queries = self.weaver.query_embeds(kind, context.shape[0])
        k = queries.shape[1]
        inputs = torch.cat([ctx, queries], dim=1).to(w_dtype)
        out, mask = self._weaver_pass(
            inputs, context_mask, context_positions, state, query_start, official
        )
        state.cache.crop(-k)  # drop the query slots: the cache keeps only real context
        state.mask = mask[:, : mask.shape[1] - k]
        last = out.hidden_states[-1] if official else out.last_hidden_state
        hidden = last[:, last.shape[1] - k :].float()
        latents = self.weaver.weaver_to_reasoner(hidden)
        return latents.to(self.dtype), hidden

    def weave_kv(
        self,
        kind: str,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        context_positions: torch.Tensor,
        state: WeaverCache,
        query_start: torch.Tensor,
    ) -> tuple[SlotKV, torch.Tensor]:
        """``memory.inject: kv``: read new context, run K query latents of ``kind`` at positions
        ``query_start + [0, K)`` (the reasoner's own), and return their keys and values at every
        layer (``SlotKV``) and the weaver's last hidden states there (B, K, D).

        ``context`` (B, T, D) are reasoner input embeddings of tokens the weaver has not read
        (the backbone is shared: no projection). The query slots *stay* in the weaver's cache:
        they are exactly what the reasoner's cache will hold at those positions, so the next
        weave reads this memory as the reasoner does.
        """
        w_dtype = self.weaver_lm.get_input_embeddings().weight.dtype
        queries = self.weaver.query_embeds(kind, context.shape[0])
        k = queries.shape[1]
        inputs = torch.cat([context.to(w_dtype), queries.to(w_dtype)], dim=1)
        out, mask = self._weaver_pass(
            inputs, context_mask, context_positions, state, query_start, False
        )
        state.mask = mask
        layers = state.cache.layers
        end = mask.shape[1]  # k may be 0, so no negative slices
        positions = latent_positions(query_start, k)
        keys = [layer.keys[:, :, end - k : end] for layer in layers]
        values = [layer.values[:, :, end - k : end] for layer in layers]
        if self.weaver.prefix_keys is not None:
            index = self.weaver.prefix_rows(kind, k).to(positions.device).expand_as(positions)
            keys, values = self.add_prefix(keys, values, index, positions)
        return SlotKV(keys, values, positions), out.last_hidden_state[:, -k:].float()

    def weave_on_cache(
        self, kind: str, cache, mask: torch.Tensor, start: torch.Tensor
    ) -> tuple[torch.Tensor | SlotKV, torch.Tensor]:
        """``memory.weaver_reads: cache``: K query latents of ``kind`` at positions ``start + [0,
        K)``, the adapter on, attend to the reasoner's own ``cache`` (``mask`` (B, T): the 2-D
        mask of what it holds) and are dropped from it again, so the caller's cache is as it
        was. Returns what ``weave`` / ``weave_kv`` return: the latents (B, K, D) or, with kv,
        the keys and values at those K positions (``SlotKV``, the kv prefix added), and the
        weaver's last hidden states there (B, K, D)."""
        queries = self.weaver.query_embeds(kind, mask.shape[0]).to(self.dtype)
        k = queries.shape[1]
        positions = latent_positions(start, k)
        if k == 0:  # nothing to run (and crop(-0) would empty the cache)
            hidden = queries.new_zeros(mask.shape[0], 0, queries.shape[-1]).float()
            memory = SlotKV([], [], positions) if self.kv else queries
            return memory, hidden
        # kv: the slots' prefix is added as their keys and values are made, so the K slots
        # read each other's as the reasoner will (as the training pass adds it).
        slots = None
        if self.kv and self.weaver.prefix_keys is not None:
            slots = self.weaver.prefix_rows(kind, k).to(positions.device).expand_as(positions)
        with self.weaver_adapter(), self.input_prefix(slots):
            out = self.weaver_lm.get_decoder()(
                inputs_embeds=queries,
                attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], k)], 1),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        hidden = out.last_hidden_state.float()
        memory = None
        if self.kv:  # copies: the cache's buffers are written again once it is cropped
            keys = [layer.keys[:, :, -k:].clone() for layer in cache.layers]
            values = [layer.values[:, :, -k:].clone() for layer in cache.layers]
            memory = SlotKV(keys, values, positions)
        cache.crop(-k)
        if memory is None:
            memory = self.weaver.weaver_to_reasoner(hidden).to(self.dtype)
        return memory, hidden

    def add_prefix(self, keys: list, values: list, index: torch.Tensor, positions: torch.Tensor):
        """``memory.kv_prefix``: per layer, the weaver's ``keys`` / ``values`` (B, kv_heads, T,
        dim) plus the learned prefix at the columns where ``index`` (B, T) names a slot (its row
        in ``Weaver.prefix_table``: prompt slots, then inference slots; -1 elsewhere), the
        prefix's keys rotated to ``positions`` (B, T) as the model rotates its own: a cached key
        means something only at its position, so the same learned key is rotated to wherever
        the slot sits. The weaver's own cache keeps its own keys and values: the prefix is what
        the reasoner reads, as prefix tuning's is."""
        table_k, table_v = self.weaver.prefix_table()
        at = index.clamp(min=0)
        on = (index >= 0)[:, None, :, None]
        cos, sin = self.reasoner.get_decoder().rotary_emb(table_k, positions)
        cos, sin = cos[:, None].to(table_k.dtype), sin[:, None].to(table_k.dtype)
        out_k, out_v = [], []
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            pk = _slot_rows(table_k[layer], at).transpose(0, 1)  # (H, B, T, D) -> (B, H, T, D)
            pv = _slot_rows(table_v[layer], at).transpose(0, 1)
            pk = pk * cos + _rotate_half(pk) * sin
            out_k.append(k + torch.where(on, pk, 0.0).to(k.dtype))
            out_v.append(v + torch.where(on, pv, 0.0).to(v.dtype))
        return out_k, out_v

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def weaver_parameters(self) -> dict[str, nn.Parameter]:
        """Everything the weaver learns: its LoRA adapter and its own tensors."""
        lora = {n: p for n, p in self.peft.named_parameters() if "lora_" in n}
        own = {f"weaver.{n}": p for n, p in self.weaver.named_parameters()}
        return {**lora, **own}

    def set_trainable(self, weaver: bool, trigger: bool) -> None:
        self._weaver_trainable = weaver
        for p in self.weaver_parameters().values():
            p.requires_grad_(weaver)
        self.trigger.requires_grad_(trigger)

    @torch.no_grad()
    def _neutral_embedding(self, tokenizer) -> torch.Tensor | None:
        """The reasoner's embedding of a space (the ``neutral`` start of the latents)."""
        ids = tokenizer.encode(" ", add_special_tokens=False)
        if not ids:
            return None
        return self.reasoner.get_input_embeddings().weight[ids[-1]].detach().float().cpu()

    @torch.no_grad()
    def _final_hidden_rms(self) -> float:
        """RMS of the weaver backbone's last-layer states on a few ordinary tokens."""
        vocab = self.weaver_lm.get_input_embeddings().weight.shape[0]
        ids = torch.arange(100, 100 + 32).remainder(vocab)[None].to(self.weaver_lm.device)
        with self.weaver_adapter():
            out = self.weaver_lm.get_decoder()(input_ids=ids)
        return _rms(out.last_hidden_state[0, 4:])  # skip the first, atypical positions


def _adds_prefix(table: torch.Tensor, at: torch.Tensor, on: torch.Tensor):
    """A forward hook adding ``table`` (kv_heads, slots, dim) rows ``at`` (B, T) to a k_proj or
    v_proj output (B, T, kv_heads x dim) where ``on`` (B, T, 1)."""

    def hook(module, args, out):
        rows = _slot_rows(table, at).permute(1, 2, 0, 3).flatten(2)  # (B, T, H x D)
        return out + torch.where(on, rows, 0.0).to(out.dtype)

    return hook


def _slot_rows(table: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Rows ``at`` (B, T) of a (kv_heads, slots, dim) prefix table: (kv_heads, B, T, dim).

    ``index_select``, not ``table[:, at]``: the same values, but advanced indexing's backward
    accumulates the many repeated rows (every column that is not a slot reads row 0) with
    parallel atomic adds on a CPU, in a different order each run, so two identical trainings
    drifted apart (held-out loss 0.0937 against 0.0991); ``index_select``'s backward adds them
    in order."""
    return table.index_select(1, at.flatten()).unflatten(1, at.shape)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's half rotation (as Llama and Qwen2 apply it to keys)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())
