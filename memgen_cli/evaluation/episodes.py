"""Evaluating on an environment task (``textworld:<challenge>``): each problem is a game,
played as an episode by ``generation.episodes.play``, a batch of games at a time.

A record of ``predictions.jsonl`` is one episode: ``score`` 1 when it was won (so the row's
accuracy ± s.e. is the success rate), ``completion`` the agent's replies with ``⟨mem K⟩``
where memory went in, ``transcript`` the whole conversation so marked, and ``episode`` its
figures (turns, invalid actions, weaves, actions). ``episode_figures`` adds to a row: mean
steps, the invalid-action rate (of all actions) and weaves per episode.
"""

from __future__ import annotations

from memgen_cli.config import GenerationConfig
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.evaluation.plan import Problem
from memgen_cli.generation.episodes import Episode, EpisodeConfig, environments, play
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.rendering import segments


def play_batch(
    model: MemGenModel,
    task: EnvironmentTask,
    label: str,
    batch: list[Problem],
    gen: GenerationConfig,
    setting: EpisodeConfig | None = None,
) -> list[dict]:
    """Play the games of ``batch`` together; one prediction record per game."""
    played = play_games(model, task, batch, gen, setting)
    tok = model.tokenizer
    return [record(label, gen.memory, p, ep, tok) for p, ep in zip(batch, played, strict=True)]


def play_games(
    model: MemGenModel,
    task: EnvironmentTask,
    batch: list[Problem],
    gen: GenerationConfig,
    setting: EpisodeConfig | None = None,
) -> list[Episode]:
    """The played episodes of ``batch``'s games, their woven latents in ``Episode.insertions``
    (``inspect-memory`` clusters them). The system turn, when the problems have one, is the
    episodes' system turn too."""
    first = batch[0].messages[0]
    system = first["content"] if first["role"] == "system" else task.system
    # Latents of earlier turns stay or go as the weaver was trained (memory.keep_latents).
    setting = setting or EpisodeConfig(task.max_turns, keep_latents=model.cfg.keep_latents)
    with environments(task, [p.example for p in batch]) as envs:
        return play(model, envs, gen, setting, system=system)


def marked(tokenizer, ep: Episode, turn: int) -> str:
    """The agent's reply of ``turn`` with a marker where memory went in."""
    woven = [i for i in ep.insertions[turn] if i.inserted]
    return "".join(text for _, text in segments(tokenizer, ep.replies[turn], woven))


def marked_messages(tokenizer, ep: Episode) -> list[dict]:
    """The episode's conversation, each reply marked where memory went in (``marked``)."""
    replies = iter(marked(tokenizer, ep, t) for t in range(ep.turns))
    return [
        {"role": "assistant", "content": next(replies)}
        if i >= ep.head and m["role"] == "assistant"
        else m
        for i, m in enumerate(ep.messages)
    ]


def record(label: str, mode: str, problem: Problem, ep: Episode, tokenizer) -> dict:
    transcript = marked_messages(tokenizer, ep)
    replies = [m["content"] for m in transcript[ep.head :] if m["role"] == "assistant"]
    return {
        "task": label,
        "mode": mode,
        "index": problem.index,
        "id": problem.example.id,
        "prompt": ep.messages[ep.first]["content"],
        "completion": "\n".join(replies),
        "extracted": "; ".join(a if a is not None else "(invalid)" for a in ep.actions),
        "gold": problem.example.answer,
        "score": float(ep.won),
        "correct": ep.won,
        "grader_error": None,
        "num_tokens": sum(len(r) for r in ep.replies),
        "finished": ep.done,  # ended by the game (won or lost), not by the turn limit
        "insertions": [
            {"turn": t, **i.summary()} for t in range(ep.turns) for i in ep.insertions[t]
        ],
        "episode": {
            "won": ep.won,
            "turns": ep.turns,
            "invalid": ep.invalid,
            "weaves": ep.weaves,
            "reward": sum(ep.rewards),
            "actions": ep.actions,
            "first": ep.first,  # the transcript's game begins here (after any example turns)
        },
        "transcript": transcript,
    }


def episode_figures(records: list[dict]) -> dict:
    """Mean steps, the invalid-action rate and weaves per episode of a row's records.

    >>> episode_figures([{"episode": {"turns": 4, "invalid": 1, "weaves": 4}},
    ...                  {"episode": {"turns": 2, "invalid": 0, "weaves": 2}}])
    {'mean_steps': 3.0, 'invalid_action_rate': 0.16666666666666666, 'weaves_per_episode': 3.0}
    """
    n = len(records)
    steps = sum(r["episode"]["turns"] for r in records)
    return {
        "mean_steps": steps / n,
        "invalid_action_rate": sum(r["episode"]["invalid"] for r in records) / max(steps, 1),
        "weaves_per_episode": sum(r["episode"]["weaves"] for r in records) / n,
    }


def episode_line(row: dict) -> str:
    """One line per episode row, under the results table."""
    return (
        f"{row['task']} · {row.get('artifact') or 'base'} · memory {row['mode']}: success "
        f"{100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f} %, {row['mean_steps']:.1f} "
        f"steps, {100 * row['invalid_action_rate']:.1f} % invalid actions, "
        f"{row['weaves_per_episode']:.1f} weaves per episode (n {row['n']})"
    )
