"""``memgen inspect-memory --data textworld:<challenge>``: the latents woven into played games.

    memgen inspect-memory --artifact DIR --data textworld:coin_collector --limit 50 \\
        --task-option level=105 --task-option objective=brief

Each game is played greedily as ``memgen eval`` plays it (``evaluation.episodes.play_games``:
the episode engine, the artifact's ``keep_latents``), ``--batch-size`` games at a time, and every
insertion is described as for many answers (``stages/inspect_memory.py``): the prompt latents
woven where each assistant turn begins (one set per woven turn) and any inference latents inside
a reply. An insertion's ``turn`` is its turn (0 = the first) and its ``relative_position`` the
turn's place in its episode (0 = first turn, 1 = last), so the cluster statistics say in which
part of an episode a cluster's latents are woven; ``correct`` is whether its episode was won.
The clusters (k-means, PCA, t-SNE, each centroid's nearest tokens) are the same. Not applicable:
``--drop-cluster`` (the engine has no per-insertion filter to re-play episodes with, yet), and
a turn-start insertion's place in its reply (always 0).
"""

from __future__ import annotations

from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.episodes import play_games
from memgen_cli.evaluation.plan import Problem
from memgen_cli.inspection import report as R
from memgen_cli.inspection import slots as S
from memgen_cli.rendering import segments

NOT_APPLICABLE = {
    "drop_cluster": "re-playing episodes with a cluster's insertions suppressed is not "
    "supported yet (the episode engine has no per-insertion filter)",
    "position_in_reply": "prompt latents are woven where a turn begins, always at position 0 "
    "of the reply; relative_position is the turn's place in its episode instead",
}


def check_games(opts) -> None:
    """What does not apply to games, refused before anything is played."""
    if opts.drop_cluster is not None:
        raise MemgenError(
            f"--drop-cluster does not apply to {opts.data}: {NOT_APPLICABLE['drop_cluster']}. "
            "Inspect the clusters without it."
        )


def inspect_games(job, describe) -> None:
    """Play every game of ``job.examples``, then describe each insertion (``describe``: the
    stage's ``_describe``) with its turn; the report's ``accuracy`` is the success rate."""
    check_games(job.opts)
    model, report, task = job.model, job.report, job.task
    tok = model.tokenizer
    assert isinstance(task, EnvironmentTask)
    size = job.opts.batch_size
    for start in range(0, len(job.examples), size):
        chunk = job.examples[start : start + size]
        problems = [Problem(start + i, ex, job.messages[start + i]) for i, ex in enumerate(chunk)]
        for problem, ep in zip(problems, play_games(model, task, problems, job.gen), strict=True):
            _describe_episode(job, describe, problem, ep, tok)
    if not report["insertions"]:
        raise MemgenError(
            f"No memory was woven in any of the {len(job.examples)} games: with --memory full "
            "the trigger declined every turn; try --memory weaver."
        )
    won = [ex["correct"] for ex in report["examples"]]
    report["accuracy"] = round(sum(won) / len(won), 4)
    report["episodes"] = {
        "games": len(won),
        "success_rate": report["accuracy"],
        "turns": [ex["turns"] for ex in report["examples"]],
        "woven_turns": sum(
            len(
                {
                    r["turn"]
                    for r in report["insertions"]
                    if r["example"] == e and r["kind"] == "prompt"
                }
            )
            for e in range(len(won))
        ),
        "position": "relative_position: the turn's place in its episode (0 = first, 1 = last)",
        "not_applicable": NOT_APPLICABLE,
    }
    job.lap("generate_s")


def _describe_episode(job, describe, problem: Problem, ep, tok) -> None:
    report, e = job.report, problem.index
    pieces, first = [], len(report["insertions"])
    for turn in range(ep.turns):
        # what the agent had read when the turn began: the conversation up to its header
        text = tok.apply_chat_template(
            ep.messages[: ep.user_index(turn) + 1],
            tokenize=False,
            add_generation_prompt=True,
        )
        seen = tok(text, add_special_tokens=False)["input_ids"]
        found = sorted((i for i in ep.insertions[turn] if i.inserted), key=lambda i: i.token_index)
        for ins in found:
            rec = describe(job, ins, len(report["insertions"]), e, ep.replies[turn], seen)
            rec.update(
                turn=turn,
                relative_position=round(turn / max(ep.turns - 1, 1), 4),
                correct=float(ep.won),
            )
            report["insertions"].append(rec)
            job.latents.append(S.memory_vectors(ins, job.model.kv))
        pieces += [("text", "\n")] * bool(turn) + segments(tok, ep.replies[turn], found)
    replies = "\n".join(tok.decode(r, skip_special_tokens=True) for r in ep.replies)
    record = R.example_record(
        e, ep.messages[ep.first]["content"],
        replies, sum(len(r) for r in ep.replies), ep.done, problem.example.id,
    )  # fmt: skip
    record.update(
        answer="; ".join(a if a is not None else "(invalid)" for a in ep.actions),
        gold=problem.example.answer,
        correct=float(ep.won),
        turns=ep.turns,
        invalid=ep.invalid,
    )
    record["segments"] = R.answer_segments(pieces, report["insertions"][first:])
    report["examples"].append(record)
