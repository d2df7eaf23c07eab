"""The frame every training stage runs in (``sft-weaver``, ``grpo-weaver``, ``train-trigger``,
``baseline sft|grpo``), so that a stage module holds only its own logic: check its settings,
build its model and trainer, train, and say what goes in its manifest.

What the frame does, in the order a stage meets it:

1. config: ``resolve_config`` reads the recipe, then ``--set``, then the command's flags (which
   win); ``resume_point`` gives the checkpoint to resume from (``sft_run``'s one rule);
2. ``Run.start``: the output guard (``artifacts.check_output``: an existing ``--output`` is
   replaced only with ``--overwrite`` or ``--resume``), before any model loads; a stage's
   ``run(cfg, resume, **options)`` hands it ``RunOptions`` (console, callbacks, overwrite);
3. build: ``Run.load_base`` (seeded first), ``Run.header`` (the run's first line, "resuming
   from", "no checkpoint"), ``Run.begin`` (the checkpoint folder and what a resume reads back),
   ``Run.callbacks`` (progress line, ``metrics.jsonl``, Ctrl-C, resume-proof logging);
4. loop: ``Run.fit`` (``trainer.train`` from the resume point; Ctrl-C -> a checkpoint and
   ``TrainingInterrupted``), or ``Run.training`` around a stage's own loop (train-trigger's);
5. save: ``Run.data_fields``, ``Run.trainer_fields`` (the summary's common fields), ``Run.save``
   (the artifact, its completions log, the checkpoints removed), ``Run.end`` (all processes
   wait for the main one's artifact), and the summary table's rows (``table``, ``trainer_rows``).

The RL stages also share ``reward_functions`` (the task's grader and the ``--reward``
plug-ins, weighted), ``grpo_fields`` (what the GRPO stages' summaries record of them) and
``heldout_accuracy`` (held-out problems scored as ``memgen eval`` does).

Layout: the artifact goes to ``cfg.output``; while a run is unfinished its checkpoints,
``recipe.yaml``, ``run.json``, ``metrics.jsonl`` and ``completions/`` live beside it in
``<output>.checkpoints/``, which is removed once the artifact is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, TypedDict

import torch
from rich.console import Console
from rich.table import Table
from transformers import PrinterCallback, set_seed

from memgen_cli import distributed
from memgen_cli.artifacts import check_output
from memgen_cli.config import dump_yaml, load_recipe, to_dict
from memgen_cli.console import make_console
from memgen_cli.data import Example, Task, to_messages
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import LoadedBase, load_base
from memgen_cli.outputs import output_kind
from memgen_cli.training import rl, sft_run
from memgen_cli.training.trainer_parts import (
    MetricsLog,
    StopOnSignal,
    Throughput,
    world_size,
)


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after writing a resumable checkpoint."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------- config
def resolve_config(
    cls,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: str | None = None,
    data: str | None = None,
    columns: dict[str, str] | None = None,
    task_options: dict | None = None,
    init: str | Path | None = None,
    artifact: str | Path | None = None,
    rewards: list[str] | None = None,
    reward_weights: list[float] | None = None,
    output: str | Path | None = None,
    report_to: str | None = None,
):
    """A ``cls`` config: the recipe, then ``--set`` overrides, then the command's flags, which
    win (a flag left out keeps the recipe's value; ``--reward`` adds to the recipe's rewards)."""
    cfg = load_recipe(cls, recipe, overrides)
    new: dict[str, Any] = {"data": sft_run.data_config(cfg.data, data, columns, task_options)}
    if base is not None:
        new["model"] = dataclasses.replace(cfg.model, base=base)
    if report_to is not None:
        new["training"] = dataclasses.replace(cfg.training, report_to=report_to)
    if rewards:
        new["reward"] = dataclasses.replace(cfg.reward, functions=[*cfg.reward.functions, *rewards])
    if reward_weights:
        r = new.get("reward", cfg.reward)
        new["reward"] = dataclasses.replace(r, weights=[*r.weights, *map(float, reward_weights)])
    if init is not None:
        new["init"] = str(init)
    if artifact is not None:
        new["artifact"] = str(artifact)
    if output:
        new["output"] = str(output)
    return dataclasses.replace(cfg, **new)


def checkpoint_dir(cfg) -> Path:
    """``<output>.checkpoints``: the unfinished run's folder, beside its artifact."""
    out = Path(cfg.output)
    return out.with_name(out.name + ".checkpoints")


def resume_point(
    cfg, resume: str | None, settings: dict | None = None, unread: tuple[str, ...] = ()
) -> Path | None:
    """The checkpoint ``--resume`` continues from (None: a fresh start), by ``sft_run``'s rule:
    only ``sft_run.RESUMABLE`` settings may differ from the checkpoints' recipe. ``settings``:
    what the run trains with, when that is not ``cfg`` itself; ``unread``: keys or sections the
    stage does not read in this configuration."""
    settings = to_dict(cfg) if settings is None else settings
    return sft_run.resume_point(checkpoint_dir(cfg), resume, settings, unread)


# ------------------------------------------------------------------------------- run


def refuse_a_fresh_start_over(cfg) -> None:
    """``--resume auto`` found no checkpoint, so the run would start from scratch: refused
    where ``cfg.output`` holds an artifact (a run that ended, whose checkpoints are gone), which
    only ``--overwrite`` may replace."""
    if output_kind(Path(cfg.output))[0] == "artifact":
        raise MemgenError(
            f"--resume auto: there is no checkpoint in {checkpoint_dir(cfg)} to continue from, "
            f"and {cfg.output} holds an artifact of a run that ended. Starting again would "
            "replace it: pass --overwrite to train it again from the start, or choose another "
            "--output."
        )


class RunOptions(TypedDict, total=False):
    """How a training stage's ``run(cfg, resume, **options)`` runs, the same for every stage
    (``resume``, which its validation reads, comes before them)."""

    console: Console | None
    """Where the header, progress line and summary print (default: a new console)."""
    callbacks: list | None
    """The caller's callbacks (tests, notebooks), after the stage's own: a Trainer's, or for
    train-trigger functions ``f(step, metrics)`` called after each step."""
    overwrite: bool
    """Replace an artifact already at ``cfg.output`` (a ``resume`` consents too); anything else
    there is refused before any model is loaded."""


@dataclasses.dataclass
class Run:
    """One training run of a stage: where it writes, where it resumes from, who prints."""

    name: str  # as the first line and the summary table name the stage ("baseline sft")
    cfg: Any  # what is trained and recorded (grpo-weaver's --init memory replaces the recipe's)
    resume: str | None  # --resume as given
    resume_from: Path | None  # the checkpoint it continues from; None: a fresh start
    console: Console
    extra: list = dataclasses.field(default_factory=list)  # the caller's callbacks
    main: bool = dataclasses.field(default_factory=lambda: distributed.info().is_main)
    stop: StopOnSignal = dataclasses.field(default_factory=StopOnSignal)  # Ctrl-C -> checkpoint
    clock: Throughput | None = None  # samples/s, set by ``callbacks``
    wall: float = 0.0  # seconds the loop took, set by ``training``
    made: list[Path] = dataclasses.field(default_factory=list)  # output's parents, not there yet

    @classmethod
    def start(
        cls,
        name: str,
        cfg,
        resume: str | None,
        resume_from: Path | None,
        overwrite: bool = False,
        console: Console | None = None,
        callbacks: list | None = None,
    ) -> Run:
        """The run of a validated ``cfg`` (``RunOptions``: ``overwrite``, ``console``,
        ``callbacks``). An artifact already at ``cfg.output`` is replaced only with
        ``overwrite`` or a resume that continues a checkpoint; anything else there is refused
        now, before any model is loaded."""
        if resume == "auto" and resume_from is None and not overwrite:
            refuse_a_fresh_start_over(cfg)
        check_output(cfg.output, kind="artifact", overwrite=overwrite or resume_from is not None)
        run = cls(name, cfg, resume, resume_from, console or make_console(), list(callbacks or []))
        run.made = [p for p in Path(cfg.output).parents if not p.exists()]  # innermost first
        return run

    @property
    def ckpts(self) -> Path:
        return checkpoint_dir(self.cfg)

    def checkpoint(self, step: int) -> Path:
        return self.ckpts / f"checkpoint-{step}"

    def say(self, text: str) -> None:
        """Print on the main process only."""
        if self.main:
            self.console.print(text)

    # --------------------------------------------------------------------------- build
    def load_base(self, device: str | None = None) -> LoadedBase:
        """The reasoner, after every RNG is seeded with ``training.seed`` (new modules draw
        their first values from it); ``device``: this process's, if not the recipe's."""
        m = self.cfg.model
        set_seed(self.cfg.training.seed)
        return load_base(m.base, device or m.device, m.dtype, m.revision)

    def header(self, text: str) -> None:
        """The run's first line, ``<name>: <text>, N process(es)``, and the checkpoint it
        resumes from; with ``--resume auto`` and nothing to resume, a line that says so."""
        resuming = f", resuming from {self.resume_from}" if self.resume_from else ""
        self.say(f"{self.name}: {text}, {world_size()} process(es){resuming}")
        if self.resume == "auto" and self.resume_from is None:
            self.say(f"--resume auto: no checkpoint in {self.ckpts}, starting from scratch")

    def warn_prompt_suffix(self, manifest: dict, source) -> None:
        """A run that starts from an artifact (``source``) with another answer format."""
        recorded = manifest.get("prompt", {}).get("prompt_suffix")
        suffix = self.cfg.data.prompt_suffix
        if recorded is not None and recorded != suffix:
            self.console.print(
                f"[yellow]warning:[/] data.prompt_suffix {suffix!r} differs from the one "
                f"{source} was trained with ({recorded!r})."
            )

    def begin(self, start: dict) -> dict:
        """Create the checkpoint folder (main process) with what a resume compares, and
        ``start``, what only a fresh start measures (a held-out score before training);
        returns the ``start`` of this run, a resumed run's as its fresh start recorded it."""
        if not self.main:
            return start
        return sft_run.begin_checkpoints(self.ckpts, self.cfg, self.resume_from, start)

    def callbacks(self, progress, args, *own) -> list:
        """A Trainer's callbacks: ``progress`` (a ``RichProgress`` class) draws the progress
        line, then ``metrics.jsonl``, Ctrl-C, resume-proof logging, the stage's ``own``, and
        the caller's (``RunOptions.callbacks``). ``args``: the Trainer's arguments (their world
        size)."""
        t = self.cfg.training
        self.clock = Throughput(t.batch_size * t.grad_accumulation * args.world_size)
        log = MetricsLog(self.ckpts / "metrics.jsonl", self.clock)
        line = progress(self.clock, self.console)
        return [line, log, self.stop, sft_run.ResumedIntervals(), *own, *self.extra]

    # ---------------------------------------------------------------------------- loop
    def fit(self, trainer) -> None:
        """``trainer.train`` from the resume point, with the progress line in place of the
        Trainer's dict printer. After Ctrl-C the Trainer has written a checkpoint, and
        ``TrainingInterrupted`` names it."""
        trainer.remove_callback(PrinterCallback)
        point = str(self.resume_from) if self.resume_from else None
        try:
            with self.training():
                trainer.train(resume_from_checkpoint=point)
        finally:  # a train() that raised never reached on_train_end: give Ctrl-C back anyway
            self.stop.on_train_end(trainer.args, trainer.state, trainer.control)
        if self.stop.stopped_at is not None:
            raise TrainingInterrupted(self.checkpoint(self.stop.stopped_at))

    @contextlib.contextmanager
    def training(self):
        """Around a training loop: its wall time (``wall``). On a ``MemgenError`` (a reward
        function failing, say) a fresh run leaves nothing behind: neither its checkpoint folder
        nor the output's parent folders it made (``made``); folders that were there stay."""
        started = time.perf_counter()
        try:
            yield
        except MemgenError:
            fresh = self.resume_from is None and not list(self.ckpts.glob("checkpoint-*"))
            if self.main and fresh:
                shutil.rmtree(self.ckpts, ignore_errors=True)
                for folder in self.made:  # innermost first; one that holds anything else stays
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise
        self.wall = time.perf_counter() - started

    # ---------------------------------------------------------------------------- save
    def data_fields(self, task: Task, data_seed: int | None = None, *, seeds: bool = True) -> dict:
        """What the run trained on, as ``memgen eval`` reads it back: the task, its data, split
        and options, the seeds that drew the training and held-out problems (not with
        ``seeds=False``: train-trigger's prompts are the weaver's leftovers), the training seed."""
        d = self.cfg.data
        fields = {"task": task.name, "data": d.path or d.task, "split": d.split}
        fields["task_options"] = dict(d.options)
        if seeds:
            fields |= {"data_seed": data_seed, "eval_seed": task.eval_seed}
        return fields | {"training_seed": self.cfg.training.seed}

    def trainer_fields(self, trainer) -> dict:
        """How a Trainer's run went: steps, epochs and samples/s, then ``end_fields``."""
        state = trainer.state
        return {
            "steps": state.global_step,
            "epochs": round(state.epoch or 0.0, 4),
            "samples_per_s": self.clock.rate(state.global_step),
            **self.end_fields(trainer.args.world_size),
        }

    def end_fields(self, processes: int) -> dict:
        return {
            "wall_s": round(self.wall, 1),
            "world_size": processes,
            # CPU float sums depend on the thread count: the same recipe at 1 and 2 threads
            # differs from its first step, so compare runs made at the same count.
            "torch_threads": torch.get_num_threads(),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
        }

    def save(self, write, model, base: LoadedBase, summary: dict, **extra) -> Path:
        """The artifact (main process), written by ``write`` (``save_artifact`` or
        ``save_baseline``) with the recipe, ``summary`` as its training record, and
        ``metrics.jsonl``; ``extra``: ``write``'s own arguments (``prompt`` defaults to the
        data section's). Then the completions log joins it, and the finished run's checkpoints
        go: there is nothing left to resume."""
        d = self.cfg.data
        extra.setdefault("prompt", {"prompt_suffix": d.prompt_suffix, "system": d.system})
        out = write(
            model,
            base,
            self.cfg.output,
            recipe_yaml=dump_yaml(self.cfg),
            training=summary,
            metrics_file=self.ckpts / "metrics.jsonl",
            **extra,
        )
        if (self.ckpts / "completions").is_dir():  # the artifact is whole without it
            shutil.move(str(self.ckpts / "completions"), str(out / "completions"))
        shutil.rmtree(self.ckpts, ignore_errors=True)
        return out

    def end(self, trainer=None) -> Path:
        """Every process waits for the main one (which wrote the artifact); its path."""
        if trainer is not None:
            trainer.accelerator.wait_for_everyone()
        else:
            distributed.barrier()
        return Path(self.cfg.output)


# ------------------------------------------------------------------ rewards and scores
def reward_functions(task_reward, r) -> tuple[list, list[float]]:
    """What an RL stage is rewarded by, and the weights: the task's grader (``task_reward``)
    unless ``reward.task_weight`` is 0, then the ``--reward`` plug-ins (``reward.weights``, or
    1 each; the stage's validation has imported them already)."""
    graders = [task_reward] if r.task_weight > 0 else []
    plugins = [rl.load_reward(spec) for spec in r.functions]
    return graders + plugins, [r.task_weight] * len(graders) + (r.weights or [1.0] * len(plugins))


def grpo_fields(funcs: list, weights: list[float], t) -> dict:
    """A GRPO run's summary fields: what it was rewarded by (``reward_functions``), G and the
    loss (``t``: its ``GRPOTrainingConfig``)."""
    return {
        "rewards": [rl.reward_name(f) for f in funcs],
        "reward_weights": weights,
        "num_generations": t.num_generations,
        "loss_type": t.loss_type,
    }


def heldout_accuracy(examples: list[Example], reward, prompt, answer, batch: int = 8) -> float:
    """Accuracy on held-out problems as ``memgen eval`` scores it: each batch rendered as chat
    messages (``prompt``: anything with ``prompt_suffix`` and ``system``), answered by
    ``answer(messages) -> texts`` (the stage's greedy generation), graded by ``reward`` (the
    task's grader, ``rl.task_reward``)."""
    hits = []
    for i in range(0, len(examples), batch):
        part = examples[i : i + batch]
        msgs = [to_messages(e, prompt.prompt_suffix, prompt.system) for e in part]
        hits += reward(prompts=msgs, completions=answer(msgs), **rl.example_columns(part))
    return sum(hits) / max(len(hits), 1)


# ---------------------------------------------------------------------------- summary
def loss_fields(log_history: list[dict]) -> dict:
    """The last logged training loss, and the mean over the run (``sft_run.mean_loss``)."""
    logged = [row["loss"] for row in log_history if "loss" in row]
    return {
        "final_loss": logged[-1] if logged else None,
        "mean_loss": sft_run.mean_loss(log_history),
    }


def first_and_final(rows: list[dict], key: str) -> dict:
    """``first_<key>`` and ``final_<key>``: the first and the last logged value (None: none)."""
    logged = [row[key] for row in rows if key in row]
    return {
        f"first_{key}": logged[0] if logged else None,
        f"final_{key}": logged[-1] if logged else None,
    }


def loss_row(s: dict) -> tuple[str, str]:
    return ("final loss", fmt(s["final_loss"], 4))


def first_and_final_row(s: dict, key: str) -> tuple[str, str]:
    """The summary table's row of ``first_and_final(rows, key)``."""
    first, final = fmt(s[f"first_{key}"]), fmt(s[f"final_{key}"])
    return (f"{key.replace('_', ' ')} first → final", f"{first} → {final}")


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(title: str, rows: list[tuple[str, str]]) -> Table:
    """The summary table printed at the end of a run: one row per (key, value)."""
    out = Table(title=title, show_header=False)
    for key, value in rows:
        out.add_row(key, value)
    return out


def trainer_rows(s: dict, result: tuple[str, str]) -> list[tuple[str, str]]:
    """A Trainer run's rows of the summary table: steps, ``result`` (its loss or reward),
    throughput and wall time."""
    return [
        ("steps / epochs", f"{s['steps']} / {s['epochs']}"),
        result,
        ("samples/s", f"{s['samples_per_s']:.2f}" if s["samples_per_s"] else "-"),
        wall_row(s),
    ]


def wall_row(s: dict) -> tuple[str, str]:
    return ("wall time", f"{s['wall_s']:.0f} s on {s['world_size']} process(es)")


def score_rows(label: str, scores: dict[str, float], digits: int) -> list[tuple[str, str]]:
    """``label (name)`` rows, one per held-out score."""
    return [(f"{label} ({k})", f"{v:.{digits}f}") for k, v in scores.items()]
