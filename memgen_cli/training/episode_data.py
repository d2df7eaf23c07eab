"""SFT samples from expert episodes of an environment task (``textworld:<challenge>``), for
``sft-weaver`` and ``baseline sft``.

Data (``expert_episode``): each training game is played by its expert, the game's shortest
plan from the current state (``Observation.expert[0]``: TextWorld's ``policy_commands``), until
the game ends or the task's ``max_turns``.

Rendering (``render``): the episode token for token as the engine (``generation/episodes.py``)
plays it: the opening (``episodes.opening``: system turn, first observation) through the chat
template with the generation prompt (``encode_prompts``), then per turn the reply's tokens and
what the engine feeds after a reply (``episodes.next_tokens``: the template's turn break, the
next observation, the next assistant header); the last reply ends with EOS. The loss covers the
agent's tokens only: each reply and the stop token that ends it (the turn break's first token,
which must be an EOS token: the engine's replies stop there); every token the environment or
the template wrote is -100.

Insertion points (``EpisodeCollator``): prompt latents after the last token before each
assistant turn (where the engine weaves as each turn begins), inference points at clause
boundaries of each reply, chosen per turn by the SFT schedule (at most
``memory.max_inference_insertions`` per turn, the engine's cap). ``memory.keep_latents``:

- true: one row per episode, every turn's latents in one forward, so later turns read earlier
  turns' latents, as the engine's kept caches do;
- false: one row per assistant turn: the text history up to it and that turn's latents only
  (the official code's one prefix forward per turn), what the engine's rewind gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from memgen_cli.config import DataConfig
from memgen_cli.data import Example, Task
from memgen_cli.data.environment import Environment, EnvironmentTask
from memgen_cli.errors import MemgenError
from memgen_cli.generation.episodes import Episode, next_tokens, opening
from memgen_cli.generation.sampling import _eos_ids, encode_prompts
from memgen_cli.models.training import IGNORE
from memgen_cli.training import sft_run
from memgen_cli.training.sft_data import SFTCollator, draw_points


@dataclass
class EpisodeSample:
    """One rendered expert episode."""

    input_ids: list[int]
    turns: list[int]  # per assistant turn: the token its prompt latents follow
    spans: list[list[int]]  # per turn: [start, end) of its agent tokens (reply + stop token)
    candidates: list[list[int]]  # per turn: clause-boundary token indices inside its reply
    index: int  # position in the training set (seeds the random schedule)
    game: str  # the example id of the game played

    def completion_mask(self) -> list[int]:
        """1 on the agent's tokens, 0 on the rest (TRL's ``completion_mask``)."""
        mask = [0] * len(self.input_ids)
        for start, end in self.spans:
            mask[start:end] = [1] * (end - start)
        return mask


def check_episode_data(
    task: EnvironmentTask, d: DataConfig, games: int, method: str = "lora"
) -> None:
    """Up-front checks for training on ``games`` games of an environment task (no model yet):
    the data section, the baseline method, and that held-out games stay off trained routes."""
    exclude = getattr(task, "exclude_train", None)
    checks = [
        (
            not d.prompt_suffix,
            "data.prompt_suffix must be empty: the environment writes every user turn itself",
        ),
        (
            exclude is None or exclude >= games,
            f"data.options.exclude_train ({exclude}) must be at least the {games} games "
            "trained on or held out for the loss (data.size + data.heldout), so that no held-out game repeats a trained "
            f"route; set --task-option exclude_train={games}",
        ),
        (
            method == "lora",
            f"baseline method {method} cannot play games (eval plays LoRA baselines only); "
            "use method lora",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise MemgenError(f"{task.name}: {message}.")


def load_examples(cfg) -> tuple[Task, list[Example], list[Example], int | None]:
    """``sft_run.load_examples``, and of an environment task ``check_episode_data``'s checks
    on the games loaded (training and held out)."""
    task, train, held, seed = sft_run.load_examples(cfg)
    if isinstance(task, EnvironmentTask):
        check_episode_data(task, cfg.data, len(train) + len(held))
    return task, train, held, seed


def expert_episode(env: Environment, max_turns: int, system: str | None = None) -> Episode:
    """The episode the expert plays: its first planned command at every turn."""
    obs = env.reset()
    ep = Episode(opening(obs, system), won=obs.won, done=obs.done)
    while not ep.done and ep.turns < max_turns:
        if not obs.expert or obs.expert[0] not in obs.commands:
            raise MemgenError(
                f"the environment's expert gave no admissible command at turn {ep.turns + 1} "
                f"(plan {obs.expert}), so this game has no expert episode to train on."
            )
        action = obs.expert[0]
        obs = env.step(action)
        ep.actions.append(action)
        ep.rewards.append(obs.reward)
        ep.won, ep.done = obs.won, obs.done
        ep.messages += [
            {"role": "assistant", "content": action},
            {"role": "user", "content": obs.text},
        ]
    return ep


def render(tokenizer, ep: Episode) -> tuple[list[int], list[int], list[list[int]]]:
    """(token ids, the token before each assistant turn, each turn's [start, end) of agent
    tokens) of a played episode, as the engine's stream holds it."""
    head = ep.head  # the system turn, if any, example turns and the first observation
    ids = encode_prompts(tokenizer, [ep.messages[:head]], "cpu")["input_ids"][0].tolist()
    stops = set(_eos_ids(tokenizer).tolist())
    turns, spans = [], []
    for t, action in enumerate(ep.actions):
        turns.append(len(ids) - 1)
        start = len(ids)
        ids += tokenizer(action, add_special_tokens=False)["input_ids"]
        if t + 1 < ep.turns:  # the engine feeds this after the reply's last token
            user = ep.messages[head + 2 * t + 1]["content"]
            tail = next_tokens(tokenizer, ep.messages[: head + 2 * t], user)
            if not tail or tail[0] not in stops:
                raise MemgenError(
                    "the tokenizer's chat template does not end an assistant turn with an EOS "
                    "token, so an episode's replies cannot be trained to stop where the engine "
                    "stops them."
                )
        else:
            tail = [tokenizer.eos_token_id]
        spans.append([start, len(ids) + 1])  # the reply and its stop token
        ids += tail
    return ids, turns, spans


def expert_samples(
    task: EnvironmentTask,
    tokenizer,
    examples: list[Example],
    system: str | None,
    max_length: int,
    delimiters: torch.Tensor | None = None,
) -> tuple[list[EpisodeSample], int]:
    """The rendered expert episode of each game, and how many were longer than ``max_length``
    tokens (dropped, never cut). ``delimiters``: the clause-boundary table (inference points)."""
    samples, dropped = [], 0
    for example in examples:
        env = task.environment(example)
        try:
            ep = expert_episode(env, task.max_turns, system or task.system)
        finally:
            env.close()
        ids, turns, spans = render(tokenizer, ep)
        if len(ids) > max_length:
            dropped += 1
            continue
        flags = [False] * len(ids) if delimiters is None else delimiters[ids].tolist()
        candidates = [[i for i in range(s, e - 1) if flags[i]] for s, e in spans]
        samples.append(EpisodeSample(ids, turns, spans, candidates, len(samples), example.id))
    return samples, dropped


def encode_episodes(model, examples, prompt_suffix, system, max_length, *, task):
    """``sft_data.encode_examples`` for an environment task (``encode_splits`` calls it)."""
    return expert_samples(
        task, model.tokenizer, examples, system, max_length, model.delimiters.cpu()
    )


def episode_pairs(tokenizer, examples, prompt_suffix, system, max_length, *, task):
    """``sft_data.tokenize_samples`` for an environment task: (token ids, completion mask)."""
    samples, dropped = expert_samples(task, tokenizer, examples, system, max_length)
    return [(s.input_ids, s.completion_mask()) for s in samples], dropped


class EpisodeCollator(SFTCollator):
    """``SFTCollator`` for episodes (its arguments, and ``keep_latents``): right-pads episodes
    into the keyword arguments of the training forward, labels on the agent's tokens, prompt
    points where each assistant turn begins, inference points drawn per turn. ``keep_latents``
    false gives one row per turn; ``memory=False`` no points (and one row per episode: without
    latents both are the same)."""

    def __init__(self, *args, keep_latents: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_latents = keep_latents

    def rows(self, item: EpisodeSample) -> list[tuple[list[int], list, list[int], list[int]]]:
        """(token ids, labelled spans, prompt points, inference points) of each row ``item``
        gives."""
        if not self.memory:
            return [(item.input_ids, item.spans, [], [])]
        inference = [
            draw_points(c, self.schedule, self.cap, (self.seed, self.epoch, item.index, t))
            for t, c in enumerate(item.candidates)
        ]
        prompt = item.turns if self.prompt_insertion else []
        if self.keep_latents:
            return [(item.input_ids, item.spans, prompt, [p for ps in inference for p in ps])]
        return [
            (item.input_ids[: span[1]], [span], prompt[t : t + 1], inference[t])
            for t, span in enumerate(item.spans)
        ]

    def __call__(self, items: list[EpisodeSample | Mapping]) -> dict:
        items = [EpisodeSample(**it) if isinstance(it, Mapping) else it for it in items]
        rows = [row for it in items for row in self.rows(it)]
        length = max(len(ids) for ids, *_ in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for b, (seq, spans, _, _) in enumerate(rows):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            for start, end in spans:
                labels[b, start:end] = ids[b, start:end]
        use_prompt = self.memory and self.prompt_insertion
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "prompt_points": [row[2] for row in rows] if use_prompt else None,
            "inference_points": [row[3] for row in rows],
            "samples": len(items),  # episodes, whatever the rows
        }
