"""Probes of one generated answer: what each latent says, how big it is, and what it does.

The answer is rebuilt as the reasoner read it, a *stream* of input embeddings: prompt tokens,
completion tokens, and each insertion's recorded latents right after the token it followed
(``models.latents.stream_layout``). Latents are taken from the trace, never re-woven, so a
teacher-forced pass over the stream reproduces the generator's own log-probabilities
(tests/test_inspect.py checks this within 1e-4) and dropping one chunk from the stream is an
exact "same answer, without this insertion" counterfactual.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.generation import GenerationOutput, Insertion, generate
from memgen_cli.models.latents import prediction_positions, stream_layout
from memgen_cli.models.memgen import MemGenModel


# ------------------------------------------------------------------------------ vocabulary
@dataclass
class Vocab:
    """The reasoner's input-embedding matrix, prepared for cosine look-ups and norm ranks."""

    unit: torch.Tensor  # (V, D) rows scaled to unit length
    sorted_norms: torch.Tensor  # (V,) ascending
    tokens: list[str]  # each id decoded on its own

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


def vocab_of(model: MemGenModel) -> Vocab:
    weight = model.reasoner.get_input_embeddings().weight.detach().float().cpu()
    norms = torch.linalg.vector_norm(weight, dim=-1)
    texts = model.tokenizer.batch_decode([[i] for i in range(weight.shape[0])])
    return Vocab(weight / norms.clamp_min(1e-12)[:, None], norms.sort().values, texts)


def nearest_tokens(
    vectors: torch.Tensor, vocab: Vocab, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` vocabulary rows by cosine for each vector (N, D): (ids (N, k), cosines (N, k)).

    This is the paper's "forced decoding" of a latent into the tokens it lies closest to.
    """
    unit = vectors.float() / torch.linalg.vector_norm(
        vectors.float(), dim=-1, keepdim=True
    ).clamp_min(1e-12)
    cos = unit @ vocab.unit.T
    top = cos.topk(min(k, cos.shape[-1]), dim=-1)
    return top.indices, top.values


def norm_percentiles(vectors: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Percentile (0-100) of each vector's L2 norm among the token-embedding norms."""
    norms = torch.linalg.vector_norm(vectors.float(), dim=-1).contiguous()
    rank = torch.searchsorted(vocab.sorted_norms, norms, right=True)
    return 100.0 * rank.float() / vocab.sorted_norms.numel()


def norm_summary(vocab: Vocab) -> dict:
    q = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0])
    values = torch.quantile(vocab.sorted_norms, q).tolist()
    return dict(zip(("min", "p1", "p50", "p99", "max"), (round(v, 4) for v in values), strict=True))


# ---------------------------------------------------------------------------------- stream
@dataclass
class Stream:
    """One answer as the reasoner read it (batch of one, no padding)."""

    embeds: torch.Tensor  # (1, S, D)
    ids: list[int]  # prompt + continuation token ids
    prompt_len: int
    num_answer_tokens: int  # continuation tokens that were fed back (EOS excluded)
    insertions: list[Insertion]  # the chunks in the stream, by token_index
    points: list[int]  # index in ``ids`` after which each chunk goes
    ks: list[int]
    token_pos: torch.Tensor  # (len(ids),) stream index of every token
    chunk_starts: list[int]  # stream index of each chunk's first latent

    def chunk(self, i: int) -> range:
        return range(self.chunk_starts[i], self.chunk_starts[i] + self.ks[i])

    def prefix_slots(self, model: MemGenModel) -> torch.Tensor:
        """Each column's kv-prefix row (``MemGenModel.input_prefix``), -1 on tokens: (1, S)."""
        index = torch.full(self.embeds.shape[:2], -1, device=self.embeds.device)
        for i, ins in enumerate(self.insertions):
            chunk = self.chunk(i)
            rows = model.weaver.prefix_rows(ins.kind, len(chunk))
            index[0, chunk.start : chunk.stop] = rows.to(index.device)
        return index

    def mask_and_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stream's attention mask (all ones) and positions 0..S-1, (1, S) each."""
        size, device = self.embeds.shape[1], self.embeds.device
        ones = torch.ones(1, size, dtype=torch.long, device=device)
        return ones, torch.arange(size, device=device)[None]


def over_stream(decoder, stream: Stream, mask=None, embeds=None, **kwargs):
    """``decoder`` (a model's ``get_decoder()``) over the whole stream at positions 0..S-1:
    ``embeds`` (default: the stream's own) under ``mask`` (default: all ones); ``kwargs`` go
    to it."""
    ones, positions = stream.mask_and_positions()
    return decoder(
        inputs_embeds=stream.embeds if embeds is None else embeds,
        attention_mask=ones if mask is None else mask,
        position_ids=positions,
        **kwargs,
    )


def head_mean_attention(out) -> torch.Tensor:
    """(layers, S, S): the attention weights of a pass with ``output_attentions``, averaged
    over heads (fused kernels return none: the caller provides eager attention)."""
    if not out.attentions:
        raise RuntimeError(
            "the reasoner returned no attention weights; eager attention is required"
        )
    return torch.stack([a[0].float().mean(0) for a in out.attentions]).cpu()


def build_stream(
    model: MemGenModel, prompt_ids: list[int], tokens: list[int], eos: int | None, insertions
) -> Stream:
    """The stream for ``prompt_ids`` + ``tokens`` (+ ``eos`` when the answer finished) with
    ``insertions`` (their recorded latents)."""
    ids = list(prompt_ids) + list(tokens) + ([] if eos is None else [eos])
    chunks = sorted(insertions, key=lambda ins: ins.token_index)
    points = [len(prompt_ids) - 1 + ins.token_index for ins in chunks]
    ks = [int(ins.latents.shape[0]) for ins in chunks]
    token_pos, starts = stream_layout([points], len(ids), [ks])
    size = len(ids) + sum(ks)
    embeds = torch.empty(
        1, size, model.reasoner.config.hidden_size, dtype=model.dtype, device=model.device
    )
    embeds[0, token_pos[0].to(model.device)] = model.embed(
        torch.tensor([ids], device=model.device)
    )[0]
    for ins, start in zip(chunks, starts[0], strict=True):
        embeds[0, start : start + ins.latents.shape[0]] = ins.latents.to(embeds)
    return Stream(
        embeds, ids, len(prompt_ids), len(tokens), chunks, points, ks, token_pos[0], starts[0]
    )


def without(stream: Stream, model: MemGenModel, index: int) -> Stream:
    """The same answer with chunk ``index`` left out (all other latents as recorded)."""
    kept = [ins for i, ins in enumerate(stream.insertions) if i != index]
    end = stream.prompt_len + stream.num_answer_tokens
    eos = stream.ids[end] if len(stream.ids) > end else None
    return build_stream(
        model, stream.ids[: stream.prompt_len], stream.ids[stream.prompt_len : end], eos, kept
    )


@torch.no_grad()
def continuation_logprobs(model: MemGenModel, stream: Stream) -> torch.Tensor:
    """Teacher-forced log-probability of every continuation token (EOS included): (n,)."""
    mask, positions = stream.mask_and_positions()
    hidden = model.reasoner_hidden(
        stream.embeds, mask, positions, slots=stream.prefix_slots(model)
    )[0]
    pred = prediction_positions(stream.token_pos[None], [stream.points], [stream.ks])[0]
    rows = pred[stream.prompt_len - 1 : len(stream.ids) - 1].to(hidden.device)
    logp = torch.log_softmax(model.lm_head(hidden[rows]), dim=-1)
    target = torch.tensor(stream.ids[stream.prompt_len :], device=logp.device)
    return logp.gather(-1, target[:, None])[:, 0]


def emitted_eos(out: GenerationOutput, row: int = 0) -> int | None:
    """The stop token a greedy run emitted (tokens exclude it), or None if it never stopped."""
    if not out.finished[row]:
        return None
    return int(out.step_logits[len(out.tokens[row])][row].argmax())


def generated_logprobs(out: GenerationOutput, row: int = 0) -> torch.Tensor:
    """The generator's own log-probability of each token it emitted (EOS included; greedy,
    with ``keep_logits=True``)."""
    eos = emitted_eos(out, row)
    picked = out.tokens[row] + ([] if eos is None else [eos])
    logp = [
        torch.log_softmax(out.step_logits[s][row].float(), dim=-1)[t] for s, t in enumerate(picked)
    ]
    return torch.stack(logp)


# ----------------------------------------------------------------------- the deep pass
@contextmanager
def eager_attention(model: MemGenModel):
    """Eager attention for the duration of the block: fused kernels (sdpa, flash) return no
    weights. Yields the implementation in use; the previous one is restored afterwards."""
    reasoner = model.reasoner
    before = reasoner.config._attn_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _set_attention(reasoner, "eager")
    try:
        yield reasoner.config._attn_implementation
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _set_attention(reasoner, before)


def _set_attention(reasoner, name: str) -> None:
    if hasattr(reasoner, "set_attn_implementation"):
        reasoner.set_attn_implementation(name)
    else:  # older transformers read the config at call time
        reasoner.config._attn_implementation = name


@dataclass
class DeepPass:
    hidden: torch.Tensor  # (S, D) final (normed) hidden states
    layers: list[torch.Tensor] | None  # per layer (S, D), final norm applied, when asked
    attention: torch.Tensor  # (layers, S, S) attention weights averaged over heads


@torch.no_grad()
def deep_pass(model: MemGenModel, stream: Stream, layers: bool = False) -> DeepPass:
    """One reasoner pass over the stream returning attention weights (needs eager attention)."""
    model._set_adapter(False)  # the reasoner, never the weaver
    decoder = model.reasoner.get_decoder()
    with model.input_prefix(stream.prefix_slots(model)):
        out = over_stream(
            decoder, stream, output_attentions=True, output_hidden_states=layers, use_cache=False
        )
    attention = head_mean_attention(out)
    per_layer = None
    if layers:
        # hidden_states = (embeddings, layer 1, ..., layer L); the last entry is already normed.
        norm = model.reasoner.get_decoder().norm
        states = out.hidden_states[1:]
        per_layer = [norm(h[0]) for h in states[:-1]] + [out.last_hidden_state[0]]
    return DeepPass(out.last_hidden_state[0], per_layer, attention)


def probe_latents(
    model: MemGenModel, vocab: Vocab, stream: Stream, layers: bool = False
) -> tuple[str, list[dict]]:
    """One eager reasoner pass over the stream; per chunk, its ``logit_lens`` (and
    ``logit_lens_layers`` with ``layers``) and ``attention``. Returns (the attention
    implementation used, one dict of record fields per chunk)."""
    with eager_attention(model) as implementation:
        deep = deep_pass(model, stream, layers=layers)
    found = []
    for i in range(len(stream.insertions)):
        rows = torch.tensor(list(stream.chunk(i)), device=deep.hidden.device)
        fields = {
            "logit_lens": logit_lens(model, vocab, deep.hidden[rows]),
            "attention": attention_mass(deep.attention, stream, i),
        }
        if deep.layers is not None:
            fields["logit_lens_layers"] = [
                [t[0] for t in logit_lens(model, vocab, h[rows], top=1)] for h in deep.layers
            ]
        found.append(fields)
    return implementation, found


def logit_lens(
    model: MemGenModel, vocab: Vocab, hidden: torch.Tensor, top: int = 3
) -> list[list[dict]]:
    """For each row of ``hidden`` (n, D): the reasoner's top next-token predictions."""
    probs = torch.softmax(model.lm_head(hidden), dim=-1).cpu()
    best = probs.topk(top, dim=-1)
    return [
        [
            {"token": vocab.tokens[int(i)], "id": int(i), "prob": round(float(p), 4)}
            for i, p in zip(ids, ps, strict=True)
        ]
        for ids, ps in zip(best.indices, best.values, strict=True)
    ]


def attention_mass(attention: torch.Tensor, stream: Stream, index: int) -> dict | None:
    """Attention that the answer tokens after chunk ``index`` give to its K positions.

    ``attention`` is (layers, S, S) averaged over heads, or (S, S). Rows are the answer tokens
    fed back to the reasoner after the chunk (a final EOS is never fed back, so it is not
    counted). ``per_layer`` is their mean attention summed over the chunk, at each layer;
    ``mass`` its mean over layers; ``uniform`` is what K positions would get if every row
    spread its attention evenly. With ``memory.inject: kv`` the K positions are the slot
    columns whose keys and values are the weaver's (``slots.read``).
    """
    if attention.dim() == 2:
        attention = attention[None]
    chunk = stream.chunk(index)
    answer = stream.token_pos[stream.prompt_len : stream.prompt_len + stream.num_answer_tokens]
    rows = answer[answer > chunk.stop - 1]
    if rows.numel() == 0:
        return None
    block = attention[:, rows][:, :, chunk.start : chunk.stop]  # (layers, rows, K)
    per_layer = block.sum(-1).mean(-1)
    uniform = (len(chunk) / (rows.float() + 1)).mean()
    return {
        "mass": round(float(per_layer.mean()), 5),
        "per_latent": [round(float(v), 5) for v in block.mean((0, 1))],
        "per_layer": [round(float(v), 5) for v in per_layer],
        "uniform": round(float(uniform), 5),
        "following_tokens": int(rows.numel()),
    }


# -------------------------------------------------------------------------------- ablation
def suppress(target: Insertion) -> Callable[[Insertion], bool]:
    """A ``keep`` hook that suppresses exactly ``target`` (same row, point and kind)."""
    return lambda ins: (
        not (
            ins.row == target.row
            and ins.token_index == target.token_index
            and ins.kind == target.kind
        )
    )


def ablated_generations(
    model: MemGenModel, prompt_ids: list[int], gen: GenerationConfig, targets: list[Insertion]
) -> GenerationOutput:
    """Regenerate once per target with that one insertion suppressed, batched: row r drops
    ``targets[r]`` (every row has the same prompt, so no padding is involved)."""
    batch = torch.tensor([prompt_ids] * len(targets), device=model.device)
    wanted = {(r, t.token_index, t.kind) for r, t in enumerate(targets)}

    def keep(ins: Insertion) -> bool:
        return (ins.row, ins.token_index, ins.kind) not in wanted

    return generate(model, batch, torch.ones_like(batch), gen, keep=keep)
