"""Prompt and prefix tuning (PEFT's prompt learning) as memgen trains and runs them.

Both put n trainable *virtual tokens* before every sequence, at positions 0 … n−1:

- prompt tuning (Lester et al. 2021): n input embeddings, which the frozen reasoner turns into
  keys and values at every layer like any other input;
- prefix tuning (Li & Liang 2021), without the reparameterisation MLP: the n keys and values
  at every layer themselves (PEFT's ``prefix_projection: false``).

The text then starts at position n. Nothing before it depends on the text, so for a trained
adapter both are a fixed cache prefix: ``virtual_prefix`` computes it once, and
``generate_after`` decodes after it with the reasoner's own passes (``MemGenModel``'s
``reasoner_hidden`` / ``lm_head``), token for token what memory off does after an empty prefix
(tests/test_baseline.py checks both, and against PEFT's own forward).

Why not PEFT's ``generate``: its prompt-learning path finds the prefill step through
``cache_position``, which transformers 5 no longer passes to ``prepare_inputs_for_generation``
(transformers#44130). Measured with peft 0.21.2 and transformers 5.25: its greedy tokens differ
from PEFT's own forward (the computation training optimises) from the first or second token on.
memgen's generation loop has no place for a cache prefix, so this short loop is owned here.
"""

from __future__ import annotations

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    initialize_kv_prefix_from_past_key_values,
)
from transformers import DynamicCache

from memgen_cli.config import GenerationConfig
from memgen_cli.generation.sampling import _eos_ids, _pick
from memgen_cli.generation.trace import GenerationOutput, MemoryTrace
from memgen_cli.models.base import LoadedBase
from memgen_cli.models.kv import growing_cache, take_rows
from memgen_cli.models.latents import positions_from_mask
from memgen_cli.models.memgen import MemGenModel

PEFT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "LORA": "lora"}


def method_of(model: PeftModel) -> str:
    """``lora``, ``prompt`` or ``prefix``: what the active adapter of ``model`` is."""
    return PEFT_TYPES[str(model.active_peft_config.peft_type.value)]


def params_per_token(model, method: str) -> int:
    """What one virtual token trains on ``model`` (a plain causal LM): prompt tuning an input
    embedding (the hidden size); prefix tuning a key and a value at every layer, each of KV
    heads × head size numbers (PEFT sizes them so, GQA included; keys are cached per KV head)."""
    config = model.config
    if method == "prompt":
        return model.get_input_embeddings().weight.shape[1]
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head


def text_ids(tokenizer, text: str, n: int) -> list[int]:
    """``text``'s token ids repeated, then cut, to ``n`` (PEFT's TEXT init rule).

    >>> class Tok:
    ...     def __call__(self, text):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> text_ids(Tok(), "ab", 5)
    [97, 98, 97, 98, 97]
    """
    ids = tokenizer(text)["input_ids"]
    return (ids * -(-n // len(ids)))[:n]


def new_adapter(
    base: LoadedBase, method: str, n: int, text: str | None, revision: str | None = None
) -> PeftModel:
    """A fresh ``method`` (prompt | prefix) adapter of ``n`` virtual tokens on ``base``'s
    model, starting from ``text``'s words (None: PEFT's random start). PEFT's prompt TEXT init
    loads the tokenizer itself, from ``base.source`` at ``revision``. Prefix tuning runs
    without the reparameterisation MLP (``prefix_projection``; see docs/stages/baseline.md)."""
    if method == "prompt":
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            prompt_tuning_init="TEXT" if text else "RANDOM",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=base.source if text else None,
            tokenizer_kwargs={"revision": revision} if text and revision else None,
        )
        return get_peft_model(base.model, config)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=False
    )
    peft = get_peft_model(base.model, config)
    if text:
        init_prefix_from_text(peft, base.tokenizer, text)
    return peft


@torch.no_grad()
def init_prefix_from_text(model: PeftModel, tokenizer, text: str) -> None:
    """Start a prefix-tuning adapter as the plain reasoner's keys and values over ``text``'s
    tokens (``text_ids``) at positions 0 … n−1, where the prefix sits (PEFT's loader)."""
    n = model.active_peft_config.num_virtual_tokens
    base = model.get_base_model()
    ids = torch.tensor([text_ids(tokenizer, text, n)], device=base.device)
    cache = DynamicCache(config=base.config)
    base.get_decoder()(input_ids=ids, cache=cache, use_cache=True)
    initialize_kv_prefix_from_past_key_values(model, past_key_values=cache)


@torch.no_grad()
def virtual_prefix(model: PeftModel) -> DynamicCache:
    """The keys and values of a trained prompt or prefix adapter's n virtual tokens at every
    layer (one row): prefix tuning's are its parameters; prompt tuning's are the reasoner's over
    its n embeddings at positions 0 … n−1 (causal: nothing after them changes them)."""
    base = model.get_base_model()
    prompt = model.get_prompt(batch_size=1)
    if method_of(model) == "prefix":
        return prompt
    n, dtype = prompt.shape[1], base.get_input_embeddings().weight.dtype
    cache = growing_cache(base.config)
    positions = torch.arange(n, device=prompt.device)[None]
    base.get_decoder()(
        inputs_embeds=prompt.to(dtype),
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    return cache


@torch.no_grad()
def generate_after(
    model: MemGenModel,
    prefix: DynamicCache | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: GenerationConfig,
) -> GenerationOutput:
    """Memory-off generation of a left-padded batch after ``prefix`` (n cached positions for
    one row, or None: nothing). The text starts at position n, as in training; per step the
    rows pick (``generation._pick``: greedy, or temperature + top-p from a generator seeded
    with ``cfg.seed``), and a row that picked EOS stops and is masked from then on."""
    batch, device = input_ids.shape[0], input_ids.device
    config = model.reasoner.config
    if prefix is None:
        cache, n = growing_cache(config), 0
    else:
        cache = take_rows(prefix, config, torch.zeros(batch, dtype=torch.long, device=device))
        n = prefix.get_seq_length()
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    positions = n + positions_from_mask(attention_mask)
    hidden = model.reasoner_hidden(model.embed(input_ids), mask, positions, cache)[:, -1]
    next_pos = positions[:, -1] + 1
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = _eos_ids(model.tokenizer).to(device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    steps = []
    while active.any() and len(steps) < cfg.max_new_tokens:
        token = torch.where(active, _pick(model.lm_head(hidden), cfg, generator), eos[0])
        steps.append(token)
        if not cfg.ignore_eos:
            active = active & ~torch.isin(token, eos)
        if not active.any() or len(steps) == cfg.max_new_tokens:
            break
        mask = torch.cat([mask, active.long()[:, None]], dim=1)
        hidden = model.reasoner_hidden(model.embed(token[:, None]), mask, next_pos[:, None], cache)
        hidden, next_pos = hidden[:, -1], next_pos + 1
    return _collect(steps, batch, set() if cfg.ignore_eos else set(eos.tolist()))


def _collect(steps: list[torch.Tensor], batch: int, eos: set[int]) -> GenerationOutput:
    """Per row, its tokens up to its first EOS (excluded), and whether it reached one."""
    grid = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(batch)]
    cuts = [next((i for i, t in enumerate(row) if t in eos), None) for row in grid]
    tokens = [row if cut is None else row[:cut] for row, cut in zip(grid, cuts, strict=True)]
    stops = [None if cut is None else row[cut] for row, cut in zip(grid, cuts, strict=True)]
    return GenerationOutput(tokens, MemoryTrace(), [c is not None for c in cuts], stop_tokens=stops)


def long_prompt(settings: dict, longest: int) -> str | None:
    """A warning when the virtual tokens matched to the weaver's budget are more than four times
    the longest sample's tokens: every training sequence grows that much, and memory with it
    (the table's recipe matches 2,774 prompt-tuning tokens on SmolLM2-135M; that training was
    killed for memory on a 24 GiB machine)."""
    n = settings.get("num_virtual_tokens")
    if settings.get("tokens_rule") == "set" or not n or n <= max(longest, 1) * 4:
        return None
    return (
        f"{n:,} virtual tokens (matched to the weaver's budget) before samples of at most "
        f"{longest} tokens: every training sequence is {n:,} tokens longer, which takes far more "
        "memory and time than the weaver or LoRA (2,774 on SmolLM2-135M was killed for memory "
        "on 24 GiB). Set fewer with --set prompt_learning.num_virtual_tokens=100 (Lester et "
        "al.'s count; the budget then differs and the manifest says so)."
    )
