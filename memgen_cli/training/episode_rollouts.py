"""GRPO rollouts that are episodes, and the policy's log-probs of every token the agent wrote.

``EpisodeRollouts``: a group is G episodes of one game (the same seed), played together by
the episode engine (``generation.episodes.play``, ``keep_logprobs``) with sampling, the weaver
woven where each assistant turn begins (and at clause boundaries, as the engine does); the
engine records each token's sampling-time log-prob, each reply's stop token, and the ids it
fed between replies.

``episode_inputs`` + ``episode_logprobs``: the same tokens scored by the batched training
forward (``weave_hidden``) in the context the episode saw, which ``memory.keep_latents``
decides (``docs/agents.md``):

- true: one row per episode, the whole conversation as the engine's cache held it (the first
  prompt, then per turn the reply and the ids fed after it), the latents of every turn at
  their exact points (turn starts: prompt latents; clause boundaries: inference latents), one
  forward over the episode;
- false: one row per turn, the text history up to the turn (every earlier reply re-read as
  plain text, as the engine does after cutting its caches back), then that turn's own latents
  and reply; the rows' log-probs are put back in their episode's place.

Either way the result is (episodes, L): every token the agent chose, each reply's stop token
included, in order, L the longest episode's count; environment tokens (observations, the chat
template's turn breaks) are context only and never scored. Where no parameter changed since
playing, the two log-probs agree to float error (tests/test_episode_grpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from memgen_cli.generation.episodes import Episode, agent_ids, picked
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import Points, weave_hidden
from memgen_cli.training.rollouts import token_logprobs


@dataclass
class EpisodeRollouts:
    """G episodes per game, rows ``g*G .. g*G+G-1`` playing game g."""

    group_size: int
    episodes: list[Episode]
    keep_latents: bool

    # What GRPO's rollout metrics read (``grpo.GRPOTrainer._record_rollouts``), per episode.
    @property
    def completion_ids(self) -> list[list[int]]:
        """Every token the agent chose, stop tokens included."""
        return [agent_ids(ep) for ep in self.episodes]

    @property
    def finished(self) -> list[bool]:
        """Every reply stopped at a stop token (none was cut at max_completion_length)."""
        return [all(ep.finished) for ep in self.episodes]

    @property
    def inference_points(self) -> list[list[int]]:
        return [
            [i.token_index for turn in ep.insertions for i in turn if i.kind == "inference"]
            for ep in self.episodes
        ]


@dataclass
class EpisodeBatch:
    """The scoring forward's rows (episodes, or turns with ``keep_latents`` false) and where
    each row's scored tokens go in the (episodes, width) result."""

    input_ids: torch.Tensor  # (M, T) right-padded
    attention_mask: torch.Tensor
    index: torch.Tensor  # (M, S): the column of each scored token of the row
    mask: torch.Tensor  # (M, S): real scored tokens
    tokens: torch.Tensor  # (M, S): the token chosen there (a stop token need not be the column's)
    prompt_points: list[list[int]]  # per row: columns after which prompt latents went
    inference_points: list[list[int]]
    owner: list[int]  # per row: its episode
    offset: list[int]  # per row: where its first scored token goes in its episode's result
    episodes: int
    width: int

    def select(self, rows: list[int]) -> EpisodeBatch:
        """The rows of episodes ``rows`` (in that order), renumbered 0, 1, ..."""
        new = {e: i for i, e in enumerate(rows)}
        keep = [m for m, e in enumerate(self.owner) if e in new]
        at = torch.tensor(keep, device=self.input_ids.device)
        return EpisodeBatch(
            *(
                t[at]
                for t in (self.input_ids, self.attention_mask, self.index, self.mask, self.tokens)
            ),
            [self.prompt_points[m] for m in keep],
            [self.inference_points[m] for m in keep],
            [new[self.owner[m]] for m in keep],
            [self.offset[m] for m in keep],
            len(rows),
            self.width,
        )

    def to(self, device) -> EpisodeBatch:
        tensors = ("input_ids", "attention_mask", "index", "mask", "tokens")
        return replace(self, **{k: getattr(self, k).to(device) for k in tensors})


@dataclass
class _Row:
    ids: list[int]
    index: list[int]
    tokens: list[int]
    prompt: list[int]
    inference: list[int]
    owner: int
    offset: int


def _turn(row: _Row, ep: Episode, t: int) -> None:
    """Append turn ``t`` to ``row``: its latents' points, its reply, its stop token's slot."""
    start = len(row.ids)  # the reply's first column; the turn's prompt latents go before it
    woven = [i for i in ep.insertions[t] if i.inserted]
    row.prompt += [start - 1 for i in woven if i.kind == "prompt"]
    row.inference += [start + i.token_index - 1 for i in woven if i.kind == "inference"]
    chosen = picked(ep, t)
    row.ids += ep.replies[t]
    row.index += range(start, start + len(chosen))
    row.tokens += chosen


def _rows(episodes: list[Episode], keep_latents: bool) -> list[_Row]:
    rows = []
    for e, ep in enumerate(episodes):
        history = list(ep.prompt_ids)
        row = _Row(list(history), [], [], [], [], e, 0)
        for t in range(ep.turns):
            if not keep_latents:  # a row per turn: the text so far, this turn's latents only
                row = _Row(list(history), [], [], [], [], e, len(row.index) + row.offset)
            _turn(row, ep, t)
            if t < len(ep.breaks):  # the engine fed them after the reply (the stop was not)
                row.ids += ep.breaks[t]
                history += ep.replies[t] + ep.breaks[t]
            elif ep.stops[t] is not None:  # the last reply: a column for its stop token
                row.ids.append(ep.stops[t])
            if not keep_latents:
                rows.append(row)
        if keep_latents:
            rows.append(row)
    return rows


def episode_inputs(
    episodes: list[Episode], keep_latents: bool, pad_id: int
) -> tuple[EpisodeBatch, dict[str, torch.Tensor]]:
    """The scoring forward's rows, and per episode and scored token (N, L): ``completion_mask``,
    ``sampling_logps`` and ``truncated`` (the token's reply was cut at max_new_tokens)."""
    rows = _rows(episodes, keep_latents)
    n, m = len(episodes), len(rows)
    counts = [len(agent_ids(ep)) for ep in episodes]
    width = max(max(counts, default=0), 1)
    length = max(len(r.ids) for r in rows)
    slots = max(max(len(r.index) for r in rows), 1)
    ids = torch.full((m, length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    index = torch.zeros(m, slots, dtype=torch.long)
    scored = torch.zeros(m, slots, dtype=torch.long)
    tokens = torch.zeros(m, slots, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
        mask[b, : len(r.ids)] = 1
        index[b, : len(r.index)] = torch.tensor(r.index, dtype=torch.long)
        scored[b, : len(r.index)] = 1
        tokens[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
    batch = EpisodeBatch(
        ids, mask, index, scored, tokens,
        [r.prompt for r in rows], [r.inference for r in rows],
        [r.owner for r in rows], [r.offset for r in rows], n, width,
    )  # fmt: skip
    completion = torch.zeros(n, width, dtype=torch.long)
    sampled = torch.zeros(n, width)
    truncated = torch.zeros(n, width, dtype=torch.bool)
    for e, ep in enumerate(episodes):
        logps = [lp for turn in ep.logprobs for lp in turn]
        cut = [s is None for t, s in enumerate(ep.stops) for _ in picked(ep, t)]
        if len(logps) != counts[e]:
            raise ValueError("episodes must be played with keep_logprobs=True")
        completion[e, : counts[e]] = 1
        sampled[e, : counts[e]] = torch.tensor(logps, dtype=torch.float32)
        truncated[e, : counts[e]] = torch.tensor(cut, dtype=torch.bool)
    grids = {"completion_mask": completion, "sampling_logps": sampled, "truncated": truncated}
    return batch, grids


def episode_logprobs(
    model: MemGenModel, episodes: EpisodeBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N, L) of every token the agent chose under the woven policy, and the entropy
    of each next-token distribution (no gradient); zeros past an episode's tokens."""
    b = episodes
    points = Points(b.prompt_points, b.inference_points)
    hidden = weave_hidden(model, b.input_ids, b.attention_mask, points)
    logps, entropy = token_logprobs(model, hidden, b.index, b.mask, b.tokens, temperature)
    real = b.mask.bool()
    row, slot = real.nonzero(as_tuple=True)
    device = logps.device
    owner = torch.tensor(b.owner, device=device)[row]
    column = torch.tensor(b.offset, device=device)[row] + slot
    grid = logps.new_zeros(b.episodes, b.width)
    return (
        grid.index_put((owner, column), logps[real]),
        grid.detach().index_put((owner, column), entropy[real]),
    )
