"""Multi-turn episodes: a batch of environment episodes played together, each keeping its KV
caches (the reasoner's and its weaver's) from the first turn to the last.

A turn, for every episode still running (the numbered steps of ``play``):
  1. open the assistant turn: the trigger decides, once per turn, whether memory is woven
     where the turn begins (memory ``full`` with a trained trigger; ``weaver`` always weaves;
     ``off`` never); the rows that invoke weave prompt latents together (``_Run.weave``);
  2. decode until every running episode's reply has stopped (EOS, or ``max_new_tokens``
     picked): the single-turn state machine's steps (``cached.decode``), inference latents
     at clause boundaries included (at most ``memory.max_inference_insertions`` per turn);
  3. read each reply's action (``parse_action``: its first line, matched against the
     admissible commands; a miss is an invalid action, counted, which the environment answers
     without a move) and step the environment; an episode that is done stops here;
  4. append the environment's answer as the next user turn: only the new tokens (the reply's
     end, the chat template's turn break, the observation, the next assistant header) run
     through the reasoner, one left-padded chunk for the batch. Nothing earlier is re-read.
Turns run in lockstep: an episode whose reply stops early waits (its decode columns masked)
for the batch's longest, so a turn costs its new tokens whatever the turn number.

Latents of earlier turns (``EpisodeConfig.keep_latents``):
  - ``True`` (default): the latents woven in a turn stay where they were woven, in the context
    of every later turn, as they would in one long generation. Training must agree: one
    forward over the whole episode, latents inserted at every turn's start.
  - ``False``: the official code's multi-turn path (its text history never holds latents):
    at a turn's end both caches go back to where the turn began and the reply is read again
    as plain text with the observation, so a turn sees its own latents only. This re-reads
    each reply once (a prefill of the reply's tokens), still never the whole history.
    Training must agree: each turn's latents visible to that turn only.

``reference_play`` (``episode_reference.py``) is the slow path: one episode at a time, the
whole stream recomputed at every step (with ``keep_latents=False``, the whole text history
re-read at every turn, as the official code does). Tests require identical greedy actions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.data.base import Example
from memgen_cli.data.environment import Environment, EnvironmentTask, Observation
from memgen_cli.errors import MemgenError
from memgen_cli.generation.cached import decode
from memgen_cli.generation.sampling import check_mode, encode_prompts
from memgen_cli.generation.state import _Run
from memgen_cli.generation.trace import Insertion, Skip
from memgen_cli.models.kv import reusable
from memgen_cli.models.memgen import MemGenModel


@dataclass
class EpisodeConfig:
    max_turns: int = 20
    """Turn limit: assistant turns per episode (an environment may end it sooner)."""
    keep_latents: bool = True
    """Latents woven in a turn stay in the context of later turns (false: each turn sees only
    its own, as in the official code). Training and generation must agree on it."""


@dataclass
class Episode:
    """One played episode: the conversation, and per turn the action, reward and memory."""

    messages: list[dict[str, str]]  # system?, example turns, user, assistant, ..., last answer
    actions: list[str | None] = field(default_factory=list)  # None: an invalid action
    rewards: list[float] = field(default_factory=list)
    replies: list[list[int]] = field(default_factory=list)  # token ids, the stop token excluded
    finished: list[bool] = field(default_factory=list)  # the reply stopped at EOS
    insertions: list[list[Insertion]] = field(default_factory=list)  # token_index: in the turn
    skips: list[list[Skip]] = field(default_factory=list)
    # What a scoring forward needs to see the context the episode saw (``play``'s
    # ``keep_logprobs``): the first prompt's ids, each reply's stop token (None: cut at
    # max_new_tokens), the ids fed after each reply but the last (the chat template's turn
    # break, the observation, the next assistant header), and the sampling-time log-prob of
    # each reply token and of its stop token.
    prompt_ids: list[int] = field(default_factory=list)
    stops: list[int | None] = field(default_factory=list)
    breaks: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    won: bool = False
    done: bool = False  # ended by the environment (won or lost), not by the turn limit

    def __post_init__(self):
        # Messages before the first reply (``opening``): the first observation is the last.
        self.head = len(self.messages)

    @property
    def first(self) -> int:
        """Index in ``messages`` of the game's first observation (after any example turns)."""
        return self.head - 1

    def user_index(self, turn: int) -> int:
        """Index in ``messages`` of the observation that ``turn``'s reply answers."""
        return self.first + 2 * turn

    @property
    def turns(self) -> int:
        return len(self.actions)

    @property
    def invalid(self) -> int:
        return sum(a is None for a in self.actions)

    @property
    def weaves(self) -> int:
        return sum(i.inserted for turn in self.insertions for i in turn)


def picked(ep: Episode, turn: int) -> list[int]:
    """The tokens the agent chose in ``turn``: the reply, then its stop token if it had one."""
    stop = ep.stops[turn]
    return ep.replies[turn] + ([stop] if stop is not None else [])


def agent_ids(ep: Episode) -> list[int]:
    """Every token the agent chose, stop tokens included (grpo-weaver's ``completion_ids``)."""
    return [t for turn in range(len(ep.replies)) for t in picked(ep, turn)]


@contextmanager
def environments(task: EnvironmentTask, examples: list[Example]) -> Iterator[list[Environment]]:
    """``task``'s environment of each of ``examples``, in order, all closed on leaving."""
    envs = []
    try:
        envs = [task.environment(e) for e in examples]
        yield envs
    finally:
        for env in envs:
            env.close()


def _normal(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().strip("`*\"'>").strip()).lower()
    return text.rstrip(".!")


def parse_action(reply: str, commands: list[str]) -> str | None:
    """The admissible command that the reply's first non-empty line names, or None.

    The line names a command when, case, surrounding quotes and spaces and a final period
    aside, it is the command or starts with it followed by a character that is not a letter
    or digit; the longest such command wins.

    >>> parse_action("Go north.\\nThen east.", ["go", "go north", "look"])
    'go north'
    >>> parse_action("go northeast", ["go north"]) is None, parse_action("", ["look"]) is None
    (True, True)
    """
    line = next((line for line in reply.splitlines() if line.strip()), "")
    text = _normal(line)
    for command in sorted(commands, key=len, reverse=True):
        name = _normal(command)
        if (
            name
            and text.startswith(name)
            and (len(text) == len(name) or not text[len(name)].isalnum())
        ):
            return command
    return None


def opening(obs: Observation, system: str | None = None) -> list[dict[str, str]]:
    """The conversation an episode starts with: the system turn, if any, the task's example
    turns (``Observation.shots``), then the first observation (``Observation.text``, formatted
    by the task) as the user turn. ``play``, the reference and the SFT episodes
    (``training/episode_data.py``) all start here."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *obs.shots, {"role": "user", "content": obs.text}]


# Stands for a reply while the chat template renders the text between two turns.
PLACEHOLDER = "MEMGEN-REPLY-7f3a"


def turn_break(tokenizer, messages: list[dict[str, str]], user: str) -> str:
    """The chat template's text from the end of an assistant reply to ``messages`` through the
    next user turn ``user`` and the next assistant header (the template is data: it says how
    turns are joined; the reply's own text is what the model wrote)."""
    before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [*messages, {"role": "assistant", "content": PLACEHOLDER}]
    after = tokenizer.apply_chat_template(
        [*turns, {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    head = before + PLACEHOLDER
    if not after.startswith(head):
        raise MemgenError(
            "the tokenizer's chat template renders earlier turns differently once a later turn "
            "follows them, so an episode cannot keep its cache across turns."
        )
    return after[len(head) :]


def next_tokens(tokenizer, messages, user: str) -> list[int]:
    """Token ids of ``turn_break``: what follows a reply's last token."""
    text = turn_break(tokenizer, messages, user)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def play(
    model: MemGenModel,
    envs: list[Environment],
    cfg: GenerationConfig,
    episode: EpisodeConfig | None = None,
    system: str | None = None,
    keep_logprobs: bool = False,
    decide=None,
) -> list[Episode]:
    """Play one episode per environment, all in one batch; ``cfg.max_new_tokens`` caps each
    reply. Greedy when ``cfg.temperature`` is 0. ``keep_logprobs`` records each sampled
    token's log-prob under softmax(logits / temperature) (GRPO's old policy). ``decide``
    (trigger RL, memory ``full``): the hook that replaces the trigger's threshold,
    ``decide(hidden, eligible, token, emitted) -> invoke``, asked at each turn's start (with
    ``token`` None) and at each clause boundary below the cap (``generation.state._Run``)."""
    episode = episode or EpisodeConfig()
    check_mode(model, cfg.memory)
    model.eval()
    tokenizer, device = model.tokenizer, model.device
    first = [env.reset() for env in envs]
    out = [Episode(opening(o, system)) for o in first]
    enc = encode_prompts(tokenizer, [e.messages for e in out], device)
    run = _Run(model, enc["input_ids"], enc["attention_mask"], cfg, decide=decide)
    for ep, ids, mask in zip(out, enc["input_ids"], enc["attention_mask"], strict=True):
        ep.prompt_ids = ids[mask.bool()].tolist()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    alive = torch.tensor([not o.done for o in first], device=device)
    last: list[Observation] = list(first)
    rewind = run.memory and not episode.keep_latents
    if rewind and not all(reusable(m.config) for m in (model.reasoner, model.weaver_lm)):
        raise MemgenError(
            "keep_latents false rewinds the caches to where each turn began, which a "
            "sliding-window model's cache cannot do (it keeps only its window); keep the "
            "latents (keep_latents true) with this model."
        )
    for turn in range(episode.max_turns):
        if not alive.any():
            break
        mark = _mark(run) if rewind else None
        woven, skips = _open_turn(run, alive, decide)  # 1
        if mark is not None:
            _mark_read(run, mark, {i.row for i in woven})
        replies, stops, logprobs = _decode_turn(run, generator, woven, keep_logprobs)  # 2
        finished = [s is not None for s in stops]
        skips += run.skips  # the trained trigger's refusals at clause boundaries
        run.skips = []
        more = turn + 1 < episode.max_turns
        chunks: list[list[int]] = [[] for _ in envs]
        for r in alive.nonzero().flatten().tolist():  # 3
            text = tokenizer.decode(replies[r], skip_special_tokens=True)
            action = parse_action(text, last[r].commands)
            last[r] = envs[r].step(action)
            ep = out[r]
            ep.actions.append(action)
            ep.rewards.append(last[r].reward)
            ep.replies.append(replies[r])
            ep.finished.append(finished[r])
            ep.stops.append(stops[r])
            if keep_logprobs:
                ep.logprobs.append(logprobs[r])
            ep.insertions.append([i for i in woven if i.row == r])
            ep.skips.append([s for s in skips if s.row == r])
            ep.won, ep.done = last[r].won, last[r].done
            alive[r] = not last[r].done
            if alive[r] and more:  # what follows the reply's last token, before it is recorded
                unfed = replies[r] if rewind else [] if finished[r] else replies[r][-1:]
                ep.breaks.append(next_tokens(tokenizer, ep.messages, last[r].text))
                chunks[r] = unfed + ep.breaks[-1]
            ep.messages.append({"role": "assistant", "content": text})
            ep.messages.append({"role": "user", "content": last[r].text})
        if not (more and alive.any()):
            break
        if mark is not None:
            _rewind(run, mark)
        _append(run, chunks)  # 4
    return out


def _open_turn(run: _Run, alive: torch.Tensor, decide=None) -> tuple[list[Insertion], list[Skip]]:
    """Step 1: reset the per-turn counters of the running rows and weave where their turn
    begins (the trigger decides once, here, in memory ``full``; ``decide`` samples instead of
    the threshold, from the state the head reads: the last token before the turn)."""
    model = run.model
    run.active, run.resumes = alive.clone(), alive.clone()
    run.chosen, run.emitted = torch.zeros_like(run.chosen), torch.zeros_like(run.emitted)
    run.left = torch.full_like(run.left, model.cfg.max_inference_insertions)
    if not run.memory:
        return [], []
    rows, probs, skips = alive.clone(), None, []
    if run.cfg.memory == "full" and model.trigger.is_trained:
        probs = model.trigger.probability(run.last)
        rows = alive & (probs >= model.cfg.trigger_threshold)
        if decide is not None:
            rows = alive & decide(run.last, alive, None, run.emitted)
        skips = [Skip(r, 0, float(probs[r])) for r in (alive & ~rows).nonzero().flatten().tolist()]
    woven = run.weave("prompt", rows, probs) if rows.any() else []
    return woven, skips


def _decode_turn(
    run: _Run, generator, woven: list[Insertion], keep_logprobs: bool = False
) -> tuple[list[list[int]], list[int | None], list[list[float]]]:
    """Step 2: every running row's reply (token ids up to its stop token), the stop token
    (None: cut at ``max_new_tokens``) and, if asked, the log-prob of each token picked, the
    stop token's included; inference insertions are added to ``woven``."""
    rows: list[list[int]] = [[] for _ in range(run.batch)]
    logprobs: list[list[float]] = [[] for _ in range(run.batch)]
    eos = set() if run.cfg.ignore_eos else set(run.eos.tolist())
    stops: list[int | None] = [None] * run.batch
    temperature = run.cfg.temperature if run.cfg.temperature > 0 else 1.0
    for token, ready, inserted, logits in decode(run, generator):
        woven += inserted
        if keep_logprobs:  # as iter_generate's: the sampling distribution at temperature
            picked = (logits / temperature).log_softmax(-1).gather(1, token[:, None])[:, 0]
        for r in ready.nonzero().flatten().tolist():
            if stops[r] is not None:
                continue
            t = int(token[r])
            if keep_logprobs:
                logprobs[r].append(float(picked[r]))
            if t in eos:
                stops[r] = t
            else:
                rows[r].append(t)
    return rows, stops, logprobs


def _append(run: _Run, chunks: list[list[int]]) -> None:
    """Step 4: run each row's new tokens through the reasoner as one chunk, left-padded (a
    finished episode's row is all padding); positions continue each row's own."""
    width = max(len(c) for c in chunks)
    device = run.mask.device
    pad = run.model.tokenizer.pad_token_id or 0
    ids = torch.full((run.batch, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(run.batch, width, dtype=run.mask.dtype, device=device)
    for r, chunk in enumerate(chunks):
        if chunk:
            ids[r, width - len(chunk) :] = torch.tensor(chunk, device=device)
            mask[r, width - len(chunk) :] = 1
    positions = run.next_pos[:, None] + (mask.long().cumsum(1) - 1).clamp(min=0)
    hidden = run._feed(run.model.embed(ids), mask, positions)
    fed = mask.sum(1).long()
    run.next_pos = run.next_pos + fed
    run.last = torch.where((fed > 0)[:, None], hidden, run.last)


@dataclass
class _Mark:
    """Where a turn began, to go back to (``keep_latents=False``): the reasoner's cache, what
    is still to read, and per row how much of it its weaver has read (``_mark_read``)."""

    columns: int
    mask: torch.Tensor
    next_pos: torch.Tensor
    pieces: list
    dropped: int
    read: list[int]
    weaver: list[int | None]


def _mark(run: _Run) -> _Mark:
    return _Mark(
        run.mask.shape[1],
        run.mask,
        run.next_pos,
        list(run.pieces),
        run.dropped,
        list(run.read),
        [None if c is None else c.length for c in run.weaver_caches],
    )


def _mark_read(run: _Run, mark: _Mark, rows: set[int]) -> None:
    """After the turn's first weave: the rows that wove have read the history up to the turn,
    and keep it (the rewind cuts their weaver caches to it, not to before the weave)."""
    if run.model.reads_cache:  # no weaver caches: the weaver reads the reasoner's
        return
    queries = run.model.weaver.num_latents("prompt") if run.kv else 0  # kv keeps its slots
    for r in rows:
        mark.weaver[r] = run.weaver_caches[r].length - queries
        mark.read[r] = run.read[r]


def _rewind(run: _Run, mark: _Mark) -> None:
    """Forget the turn since ``mark``: its latents and its reply, in the reasoner's cache (the
    columns after the mark are cut; columns before it that latents filled are masked again)
    and in every weaver cache (cut to what it had read)."""
    _cut(run.cache, run.mask.shape[1], mark.columns)
    run.mask, run.next_pos = mark.mask, mark.next_pos
    run.pieces, run.dropped, run.read = list(mark.pieces), mark.dropped, list(mark.read)
    for r, length in enumerate(mark.weaver):
        state = run.weaver_caches[r]
        if length is None or state is None:
            run.weaver_caches[r] = None
            continue
        _cut(state.cache, state.length, length)
        state.mask = state.mask[:, :length]


def _cut(cache, length: int, keep: int) -> None:
    """Keep the first ``keep`` of a cache's ``length`` positions (full-attention layers)."""
    if length > keep:
        cache.crop(keep - length)  # transformers 5: a negative count of positions to drop
