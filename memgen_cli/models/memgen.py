"""MemGen: a frozen reasoner, a memory weaver and a memory trigger, composed.

With the default shared backbone there is one copy of the weights: the weaver is a PEFT LoRA
adapter named ``weaver`` injected into the reasoner's own model, and every reasoner pass runs
with adapter layers disabled (tests/test_model.py proves it equals the plain model). A separate
weaver backbone (e.g. a smaller LM) also works; the projections then map between hidden sizes.

Adapters are *off* by default and switched on only for the duration of a weaver pass, because
reasoner passes (one per generated token) far outnumber weaver passes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import DynamicCache

from memgen_cli.config import MemoryConfig
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
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shared = weaver_backbone is None
        for p in reasoner.parameters():
            p.requires_grad_(False)
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
            hidden_rms=self._final_hidden_rms(),
            neutral_embedding=self._neutral_embedding(tokenizer),
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

    def reasoner_hidden(self, embeds, mask, positions, cache=None) -> torch.Tensor:
        """Last-layer hidden states of the frozen reasoner (adapters off): (B, T, D)."""
        self._set_adapter(False)
        out = self.reasoner.get_decoder()(
            inputs_embeds=embeds.to(self.dtype),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.reasoner.get_output_embeddings()(hidden).float()

    # -------------------------------------------------------------------------------- weaver
    def new_weaver_cache(self) -> WeaverCache:
        return WeaverCache(DynamicCache(config=self.weaver_lm.config))

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
        batch = context.shape[0]
        w_dtype = self.weaver_lm.get_input_embeddings().weight.dtype
        ctx = self.weaver.reasoner_to_weaver(context.float())
        queries = self.weaver.query_embeds(kind, batch)
        k = queries.shape[1]
        inputs = torch.cat([ctx, queries], dim=1).to(w_dtype)
        ones = torch.ones(batch, k, dtype=context_mask.dtype, device=context_mask.device)
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
        kept = mask.shape[1] - k
        state.cache.crop(-k)  # drop the query slots: the cache keeps only real context
        state.mask = mask[:, :kept]
        last = out.hidden_states[-1] if official else out.last_hidden_state
        hidden = last[:, last.shape[1] - k :].float()
        latents = self.weaver.weaver_to_reasoner(hidden)
        return latents.to(self.dtype), hidden

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


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)
