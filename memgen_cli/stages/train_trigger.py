"""`memgen train-trigger`: learn when to weave. RL on the trigger head, weaver frozen.

Reads top to bottom: validate (config values, batch divisible by G, the weaver artifact,
resume point) -> build (the artifact's model, the head started unsaturated; prompts: by
default a third of the training split, minus what the weaver saw) -> loop (per step: G
rollouts per prompt with sampled INVOKE/SKIP decisions, task reward minus the sparsity penalty
of paper Eq. 9, group advantages, the clipped objective over decisions; see
``training/trigger_rl.py``) -> save (an atomic artifact with ``trigger.safetensors``, the
weaver's tensors as they were, the parent in the manifest, ``metrics.jsonl``, ``completions/``).

The trainable part is a two-layer head over recorded hidden states: no model forward runs in
the loss, so the loop is a plain optimizer loop, not transformers' Trainer. Checkpoints go to
``<output>.checkpoints/checkpoint-N`` (head, optimizer, scheduler, step); rollouts are seeded
by step, so a resumed run regenerates exactly the rollouts it would have made. Ctrl-C writes
a checkpoint; ``--resume auto`` continues. With torchrun the step's prompts are split across
processes (whole groups of G each), the head's gradients and the metrics are averaged over
them, and rank 0 writes the metrics, checkpoints and the artifact while the others wait.
On games (``textworld:<challenge>``) a rollout is an episode and the trigger decides where each
turn begins (``training/episode_trigger.py``; the loss and the loop are the same).
What every training stage shares (config, output guard, resume, summary fields, artifact) is
``stages/frame.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path
from typing import Unpack

import torch
from rich.table import Table
from safetensors.torch import load_file, save_file
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

from memgen_cli import distributed
from memgen_cli.artifacts import (
    TRIGGER_FILE,
    load_artifact,
    read_manifest,
    require_kind,
    save_artifact,
)
from memgen_cli.config import GenerationConfig, TriggerConfig
from memgen_cli.data import Example, get_task, to_messages
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.data.episode_rewards import won
from memgen_cli.errors import MemgenError, require, require_choice
from memgen_cli.generation.episodes import EpisodeConfig
from memgen_cli.stages import frame
from memgen_cli.stages.frame import TrainingInterrupted as TrainingInterrupted
from memgen_cli.stages.frame import checkpoint_dir as checkpoint_dir
from memgen_cli.training import episode_trigger, rl, trigger_rl
from memgen_cli.training.episode_data import check_episode_data
from memgen_cli.training.trigger_rl import init_head, trigger_rollout, trigger_update


# ----------------------------------------------------------------------------- config
def resolve_config(recipe=None, overrides=None, **flags) -> TriggerConfig:
    """Recipe, then ``--set`` overrides, then the command's own flags (which win):
    ``artifact``, ``base``, ``data``, ``task_options``, ``rewards``, ``output``."""
    return frame.resolve_config(TriggerConfig, recipe, overrides, **flags)


def validate(
    cfg: TriggerConfig, resume: str | None, world_size: int = 1
) -> tuple[dict, Path | None]:
    """Check what the types cannot; return the artifact's manifest and the resume point."""
    t, d, tr, r = cfg.training, cfg.data, cfg.trigger, cfg.reward
    g, b = t.num_generations, t.batch_size
    if cfg.artifact is None:
        raise MemgenError(
            "train-trigger needs --artifact DIR: a weaver artifact (from sft-weaver or "
            "grpo-weaver) whose trigger to train."
        )
    if g < 2:
        raise MemgenError(
            f"training.num_generations must be >= 2 (got {g}): advantages compare the rewards "
            "of a prompt's rollouts with each other."
        )
    if b < 1 or b % g:
        raise MemgenError(
            f"training.batch_size ({b}) must be a multiple of training.num_generations ({g}); "
            f"e.g. --set training.batch_size={max(g, b // g * g)}."
        )
    if (b // g) % world_size:  # each process answers whole groups, as many as the others
        raise MemgenError(
            f"{b // g} prompts per step (training.batch_size {b} / training.num_generations "
            f"{g}) do not split evenly over {world_size} processes; set training.batch_size to a "
            f"multiple of {g * world_size}, e.g. --set training.batch_size="
            f"{-(-b // (g * world_size)) * g * world_size}, or change --nproc_per_node."
        )
    rl.check_loss_names(t)
    require_choice("training.scheduler", t.scheduler, tuple(s.value for s in SchedulerType))
    checks = [
        (t.learning_rate > 0, "training.learning_rate must be > 0"),
        (t.max_steps > 0, "training.max_steps must be > 0"),
        (t.temperature >= 0, "training.temperature must be >= 0 (0 = greedy tokens)"),
        *rl.rollout_checks(t),
        (t.save_steps >= 1, "training.save_steps must be >= 1"),
        (tr.penalty >= 0, "trigger.penalty must be >= 0"),
        (0 < tr.initial_rate < 1, "trigger.initial_rate must be in (0, 1)"),
        (
            tr.reference in trigger_rl.REFERENCES,
            f"trigger.reference must be one of {', '.join(trigger_rl.REFERENCES)}",
        ),
        (tr.entropy_coef >= 0, "trigger.entropy_coef must be >= 0"),
        (d.size is None or d.size >= 1, "data.size must be >= 1 (or null for a third)"),
        (d.heldout >= 0, "data.heldout must be >= 0"),
    ]
    require(checks)
    rl.check_rewards(r)
    manifest = read_manifest(cfg.artifact)
    require_kind(manifest, cfg.artifact, "weaver")
    if not manifest.get("tensors", {}).get("weaver"):
        raise MemgenError(f"{cfg.artifact} holds no weaver tensors; train a weaver first.")
    return manifest, frame.resume_point(cfg, resume)


# ------------------------------------------------------------------------------- data
def weaver_questions(task, manifest: dict, d) -> set[str]:
    """The questions the artifact's weaver was trained on, when its manifest says which."""
    rec = manifest.get("training", {})
    if rec.get("data") != (d.path or d.task) or rec.get("split", "train") != d.split:
        return set()
    seen = (rec.get("samples") or rec.get("prompts") or 0) + (rec.get("dropped_too_long") or 0)
    seen += (rec.get("heldout_samples") or 0) + (rec.get("heldout_dropped_too_long") or 0)
    if seen <= 0:
        return set()
    return {e.question for e in task.load(d.split, limit=seen, seed=rec.get("data_seed"))}


def select_examples(cfg: TriggerConfig, manifest: dict):
    """(task, training prompts, held-out, how many the weaver's were left out).

    By default (``data.size`` null) a third of the split, after removing the weaver's own
    training questions (the paper trains the trigger on a separate third).
    """
    d = cfg.data
    options = dict(d.options) | ({"path": d.path} if d.path else {})
    task = get_task(d.task, **options)
    seen = weaver_questions(task, manifest, d)
    want = None if d.size is None else d.size + d.heldout + len(seen)
    pool = task.load(d.split, limit=want, seed=d.seed)
    fresh = [e for e in pool if e.question not in seen]
    n = d.size if d.size is not None else max(1, len(pool) // 3)
    train, held = fresh[:n], fresh[n : n + d.heldout]
    if not train:
        raise MemgenError(
            f"{d.path or d.task} has no training prompts left after removing the "
            f"{len(seen)} the weaver was trained on; set data.size or use another split."
        )
    return task, train, held, len(pool) - len(fresh)


def prompt_order(n: int, seed: int, i: int) -> int:
    """The i-th prompt drawn: a fresh seeded permutation per pass (resumable by construction)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + i // n))
    return int(perm[i % n])


# ------------------------------------------------------------------------ checkpoints
def save_checkpoint(ckpts: Path, step: int, trigger, opt, sched) -> Path:
    point = ckpts / f"checkpoint-{step}"
    tmp = ckpts / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trigger.state_dict().items()}, tmp / TRIGGER_FILE)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    shutil.rmtree(point, ignore_errors=True)
    tmp.rename(point)
    for old in ckpts.glob("checkpoint-*"):  # keep the newest two
        if old != point and int(old.name.split("-")[1]) < step - 1:
            shutil.rmtree(old, ignore_errors=True)
    return point


def load_checkpoint(point: Path, trigger, opt, sched) -> int:
    trigger.load_state_dict(load_file(point / TRIGGER_FILE))
    state = torch.load(point / "optim.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(json.loads((point / "trainer_state.json").read_text())["global_step"])


class _CtrlC:
    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no Ctrl-C hook
            self.previous = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def anywhere(self) -> bool:
        """Whether any process was asked to stop (every rank must stop at the same step)."""
        flag = torch.tensor([int(self.requested)])
        if distributed.info().enabled:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ------------------------------------------------------------------------------- run
def run(cfg: TriggerConfig, resume: str | None = None, **options: Unpack[frame.RunOptions]) -> Path:
    """Train the trigger of ``cfg.artifact`` and write the new artifact; returns its path.

    ``callbacks``: functions ``f(step, metrics)`` called after each step (tests, notebooks),
    on every process, with the metrics of all of them. ``overwrite``: replace an artifact
    already at ``cfg.output`` (even ``cfg.artifact`` itself, read whole before it is replaced;
    a ``resume`` consents too); anything else there is refused before any model is loaded.
    """
    dist = distributed.init()  # gloo: the collectives move small CPU tensors
    try:
        return _run(cfg, resume, dist, **options)
    finally:
        distributed.finish()


def _run(cfg: TriggerConfig, resume: str | None, dist, **options: Unpack[frame.RunOptions]):
    # 1. validate
    manifest, resume_from = validate(cfg, resume, dist.world_size)
    run = frame.Run.start("train-trigger", cfg, resume, resume_from, **options)
    t, d, tr = cfg.training, cfg.data, cfg.trigger
    task, train, held, excluded = select_examples(cfg, manifest)
    # Games: each rollout is an episode, the trigger deciding where each turn begins
    # (training/episode_trigger.py); held-out games must stay off every route loaded here.
    games = isinstance(task, EnvironmentTask)
    if games:
        check_episode_data(task, d, len(train) + len(held) + excluded)

    # 2. build
    base = run.load_base(distributed.device_for_rank(cfg.model.device, dist.local_rank))
    model, manifest, base = load_artifact(cfg.artifact, base)
    model.set_trainable(weaver=False, trigger=True)
    trigger = model.trigger
    trigger.float()
    recorded = manifest.get("prompt", {})
    suffix = d.prompt_suffix or recorded.get("prompt_suffix") or ""
    system = d.system if d.system is not None else recorded.get("system")
    if games:
        system = system or task.system
        episode = EpisodeConfig(task.max_turns, model.cfg.keep_latents)
    funcs, weights = frame.reward_functions(won if games else rl.task_reward(task), cfg.reward)
    init_head(trigger, tr.initial_rate)
    opt = torch.optim.AdamW(trigger.parameters(), lr=t.learning_rate, weight_decay=0.0)
    warmup = int(t.warmup * t.max_steps) if t.warmup < 1 else int(t.warmup)
    sched = get_scheduler(t.scheduler, opt, num_warmup_steps=warmup, num_training_steps=t.max_steps)
    ckpts = run.ckpts
    start = load_checkpoint(resume_from, trigger, opt, sched) if resume_from else 0
    metrics_file = ckpts / "metrics.jsonl"
    run.begin({})
    if run.main:
        if resume_from is None:
            metrics_file.write_text("")
        else:  # drop rows logged after the checkpoint: they will be logged again
            rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            kept = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
            metrics_file.write_text(kept)
    g, w = t.num_generations, dist.world_size
    per_step = t.batch_size // g
    mine = per_step // w  # this process's prompts: the step's k-th block of them
    run.header(
        f"{len(train)} {'games' if games else 'prompts'} from {task.name} ({excluded} seen by "
        f"the weaver left out), G={g}, {per_step} {'games' if games else 'prompts'} per step"
        + (f" ({mine} per process)" if w > 1 else "")
        + f", λ={tr.penalty}, start rate {tr.initial_rate}, weaver frozen, from {cfg.artifact}"
    )

    # 3. loop
    with run.training(), _CtrlC() as stop:
        for step in range(start, t.max_steps):
            first = step * per_step + dist.rank * mine
            exs = [train[prompt_order(len(train), t.seed, first + k)] for k in range(mine)]
            gen = GenerationConfig(
                max_new_tokens=t.max_completion_length,
                temperature=t.temperature,
                top_p=t.top_p,
                seed=t.seed * 100_003 + step + 1_000_003 * dist.rank,  # rank 0: one process's
                memory="full",
            )
            if games:
                roll = episode_trigger.play_trigger_groups(
                    model, task, exs, gen, g, episode, system
                )
                task_r = episode_trigger.episode_task_rewards(roll, exs, funcs, weights)
                m, per_row = trigger_update(trigger, roll, task_r, opt, sched, t, tr)
                m |= episode_trigger.episode_metrics(roll, episode.max_turns)
            else:
                msgs = [to_messages(e, suffix, system) for e in exs]
                roll = trigger_rollout(model, msgs, gen, g)
                m, per_row = train_step(model, roll, exs, msgs, funcs, weights, cfg, opt, sched)
            m = {"step": step + 1, **m, "lr": sched.get_last_lr()[0], "world_size": w}
            if run.main and ((step + 1) % t.logging_steps == 0 or step + 1 == t.max_steps):
                with metrics_file.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                run.console.print(progress_line(m, t.max_steps))
            if t.log_completions_steps and (step == 0 or (step + 1) % t.log_completions_steps == 0):
                rows_of = episode_trigger.episode_rows if games else completion_rows
                shown = rows_of(
                    step + 1, model.tokenizer, exs if games else msgs, roll, per_row,
                    dist.rank * mine,
                )  # fmt: skip
                parts = distributed.gather_to_main(shown)
                if run.main:
                    write_rows(ckpts / "completions" / f"step_{step + 1:05d}.jsonl", parts)
            for cb in run.extra:
                cb(step + 1, m)
            if stop.anywhere():
                if run.main:
                    save_checkpoint(ckpts, step + 1, trigger, opt, sched)
                distributed.barrier()
                raise TrainingInterrupted(run.checkpoint(step + 1))
            if (step + 1) % t.save_steps == 0 and step + 1 < t.max_steps:
                if run.main:
                    save_checkpoint(ckpts, step + 1, trigger, opt, sched)
                distributed.barrier()
    require_same_head(trigger)

    # 4. save (rank 0; the others wait so that the run ends together)
    if run.main:
        rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        summary = {
            "stage": "train-trigger",
            **run.data_fields(task, seeds=False),
            "prompts": len(train),
            "weaver_prompts_excluded": excluded,
            "penalty": tr.penalty,
            "reference": tr.reference,
            "scale_rewards": t.scale_rewards,
            "initial_rate": tr.initial_rate,
            "num_generations": g,
            "steps": t.max_steps,
            **({"episodes": dataclasses.asdict(episode)} if games else {}),
            **frame.first_and_final(rows, "invocation_rate"),
            **frame.first_and_final(rows, "task_reward"),
            **run.end_fields(w),
        }
        prompt = {"prompt_suffix": suffix, "system": system}
        out = run.save(save_artifact, model, base, summary, prompt=prompt, parent=cfg.artifact)
        run.console.print(summary_table(summary, out))
    return run.end()


def require_same_head(trigger) -> None:
    """Every process's head must be the same (same start, same averaged steps); else a bug."""
    if not distributed.info().enabled:
        return
    flat = torch.cat([p.detach().float().cpu().flatten() for p in trigger.parameters()])
    low, high = flat.clone(), flat.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):  # every rank sees the same verdict: none is left waiting
        raise RuntimeError("the processes' trigger heads differ after training")


def train_step(model, roll, exs: list[Example], msgs, funcs, weights, cfg, opt, sched):
    """Task rewards of the rollouts, then the head's update (``trigger_rl.trigger_update``).

    Returns (step metrics, per-rollout task reward / penalty / advantage for the log)."""
    g = cfg.training.num_generations
    rep = [e for e in exs for _ in range(g)]
    texts = model.tokenizer.batch_decode(roll.completion_ids, skip_special_tokens=True)
    _, task_r = rl.score(
        funcs, weights, [m for m in msgs for _ in range(g)], texts, rl.example_columns(rep)
    )
    return trigger_update(model.trigger, roll, task_r, opt, sched, cfg.training, cfg.trigger)


def progress_line(m: dict, total: int) -> str:
    rate = "-" if m["invocation_rate"] is None else f"{m['invocation_rate']:.2f}"
    return (
        f"step {m['step']}/{total}  reward {m['reward']:.3f} (task {m['task_reward']:.3f}, "
        f"penalty {m['penalty']:.3f})  invoke {rate} p̄ {m['p_bar']:.2f}  "
        f"decisions {m['decisions_per_completion']:.1f} invocations "
        f"{m['invocations_per_completion']:.1f}/completion  entropy {m['entropy']:.3f}  "
        f"clip {m['clip_ratio']:.2f}" + (episode_trigger.progress(m) if "episodes/won" in m else "")
    )


def completion_rows(step: int, tokenizer, msgs, roll, per_row: dict, first_group: int = 0):
    """A completions log's rows: each rollout with every decision's probability.

    ``first_group``: the number of this process's first group in the step (its rank's offset).
    """
    g = roll.group_size
    return [
        {
            "step": step,
            "group": first_group + i // g,
            "prompt": msgs[i // g][-1]["content"],
            "completion": tokenizer.decode(ids, skip_special_tokens=True),
            **{k: round(float(v[i]), 4) for k, v in per_row.items()},
            "decisions": [
                {
                    "token_index": x.token_index,
                    "token": tokenizer.decode([x.token]),
                    "prob": round(x.prob, 4),
                    "invoke": x.invoke,
                }
                for x in roll.decisions[i]
            ],
        }
        for i, ids in enumerate(roll.completion_ids)
    ]


def write_rows(file: Path, parts: list[list[dict]]) -> None:
    """completions/step_NNNNN.jsonl: every process's rows, in rank order."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row) + "\n" for part in parts for row in part))


def summary_table(s: dict, out: Path) -> Table:
    rows = [
        ("task", f"{s['task']} ({s['prompts']} prompts, G={s['num_generations']})"),
        ("λ (trigger.penalty)", f"{s['penalty']}"),
        frame.first_and_final_row(s, "invocation_rate"),
        frame.first_and_final_row(s, "task_reward"),
        ("steps", str(s["steps"])),
        frame.wall_row(s),
    ]
    return frame.table(f"train-trigger → {out}", rows)
