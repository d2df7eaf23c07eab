"""What every Trainer stage shares (``sft-weaver``, ``baseline sft``; ``grpo-weaver`` and
``baseline grpo`` use the data, checks and arguments too), so that a LoRA baseline and a weaver
trained from the same recipe sections see the same examples, batches and schedule:

- ``data_config``: the ``--data`` / ``--columns`` flags onto a recipe's ``DataConfig``;
- ``load_examples``: the task, its training and held-out examples, and the data seed used;
- ``validate_training``: the checks of a training section (``SFTTrainingConfig`` or
  ``GRPOTrainingConfig``) and ``DataConfig`` that their types cannot express;
- ``resume_point``: the checkpoint to resume from, refusing a resume that changes a setting
  outside ``RESUMABLE`` (naming each key with both values); every stage's one rule;
- ``begin_checkpoints``: the checkpoint folder with what a resume compares and reads back
  (the recipe, the process count, the values only a fresh start computes), so a resumed
  run's manifest equals an uninterrupted one's except in ``EXECUTION_FIELDS``;
- ``ResumedIntervals``, ``mean_loss``: the Trainer stages' logging made resume-proof;
- ``trainer_arguments``: a training section as keyword arguments of transformers'
  ``TrainingArguments`` (TRL's configs extend it, so the same dict feeds ``trl.SFTConfig`` and
  ``trl.GRPOConfig``); ``grpo_arguments``: a GRPO section's sampling and loss settings, which
  grpo-weaver's ``GRPOSettings`` and ``trl.GRPOConfig`` take under the same names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback
from transformers.trainer_utils import SchedulerType, get_last_checkpoint

from memgen_cli import distributed
from memgen_cli.config import (
    DataConfig,
    GRPOTrainingConfig,
    MemoryConfig,
    SFTTrainingConfig,
    dump_yaml,
)
from memgen_cli.data import Example, Task, get_task
from memgen_cli.errors import MemgenError, require
from memgen_cli.models.weaver import INITS, INJECTS, READS

REPORTERS = ("none", "tensorboard", "wandb")
MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
FILE_TASKS = ("gsm8k", "jsonl", "math", "gpqa", "triviaqa", "kodcode")


def data_config(
    d: DataConfig,
    data: str | None,
    columns: dict[str, str] | None,
    options: dict | None = None,
) -> DataConfig:
    """``--data`` (a task name or a file), ``--columns`` and ``--task-option`` over the
    recipe's data section (task options are merged into the recipe's, key by key)."""
    if options:
        d = dataclasses.replace(d, options={**d.options, **options})
    if columns:
        d = dataclasses.replace(d, columns=dict(columns))
    if data is None:
        return d
    if data.endswith(".jsonl") or Path(data).exists():
        task = d.task if d.task in FILE_TASKS else "gsm8k"
        return dataclasses.replace(d, path=data, task="jsonl" if d.columns else task)
    return dataclasses.replace(d, task=data, path=None)


def load_examples(cfg) -> tuple[Task, list[Example], list[Example], int | None]:
    """The task, its training and held-out examples, and the data seed actually used
    (``cfg.data`` is a ``DataConfig``)."""
    d = cfg.data
    options = dict(d.options)
    if d.path is not None:
        options["path"] = d.path
    if d.columns:
        options["columns"] = dict(d.columns)
    task = get_task(d.task, **options)
    want = None if d.size is None else d.size + d.heldout
    examples = task.load(d.split, limit=want, seed=d.seed)
    if len(examples) <= d.heldout:
        raise MemgenError(
            f"{d.path or d.task} gave {len(examples)} examples, not enough for training plus "
            f"{d.heldout} held out."
        )
    cut = len(examples) - d.heldout
    seed = d.seed
    if seed is None:  # the task's own seed for the split trained on (generated tasks)
        seed = task.seed_for(d.split or task.default_split)
    return task, examples[:cut], examples[cut:], seed


def validate_training(t: SFTTrainingConfig | GRPOTrainingConfig, d: DataConfig) -> None:
    try:
        SchedulerType(t.scheduler)
    except ValueError:
        names = ", ".join(s.value for s in SchedulerType)
        raise MemgenError(
            f'training.scheduler "{t.scheduler}" is unknown; use one of {names}.'
        ) from None
    for name in (n.strip() for n in t.report_to.split(",")):
        if name not in REPORTERS:
            raise MemgenError(f'--report-to must be none, tensorboard or wandb; got "{name}".')
        if name != "none" and not any(importlib.util.find_spec(m) for m in MODULES[name]):
            raise MemgenError(f"--report-to {name} needs the {name} package: pip install {name}")
    checks = [
        (t.learning_rate > 0, "training.learning_rate must be > 0"),
        (
            t.batch_size >= 1 and t.grad_accumulation >= 1,
            "batch_size and grad_accumulation must be >= 1",
        ),
        (t.max_steps > 0 or t.epochs > 0, "set training.epochs > 0 or training.max_steps > 0"),
        (t.warmup >= 0, "training.warmup must be >= 0 (a fraction if < 1, else steps)"),
        (d.max_length > 1, "data.max_length must be > 1"),
        (d.size is None or d.size >= 1, "data.size must be >= 1 (or null for all)"),
        (d.heldout >= 0, "data.heldout must be >= 0"),
    ]
    require(checks)


def validate_memory(m: MemoryConfig) -> None:
    """The checks of a recipe's ``memory`` section that its types cannot express, before any
    model is built (a baseline's too: it sets the LoRA rank)."""
    checks = [
        (
            m.prompt_latents >= 0 and m.inference_latents >= 0,
            "prompt_latents and inference_latents must be >= 0",
        ),
        (m.max_inference_insertions >= 0, "max_inference_insertions must be >= 0"),
        (m.lora_r >= 1 and m.lora_alpha > 0, "lora_r must be >= 1 and lora_alpha > 0"),
        (0 <= m.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (bool(m.lora_targets), "lora_targets needs at least one module name (e.g. q_proj,v_proj)"),
        (m.projection_init in INITS, f"projection_init must be one of {', '.join(INITS)}"),
        (m.inject in INJECTS, f"inject must be one of {', '.join(INJECTS)}"),
        (m.weaver_reads in READS, f"weaver_reads must be one of {', '.join(READS)}"),
        (
            m.kv_prefix_rate > 0,
            "kv_prefix_rate must be > 0 (how many times faster the prefix learns)",
        ),
        (m.trigger_hidden >= 1, "trigger_hidden must be >= 1"),
        (0 <= m.trigger_threshold <= 1, "trigger_threshold must be in [0, 1]"),
    ]
    require(checks, "memory.")


# ----------------------------------------------------------------------------- resume
# The settings that may change when a run is resumed: how long it trains, where it computes and
# writes, and how often it logs or saves. Every other key of the resolved config (and the
# number of processes) changes the data, the model or the optimisation trajectory, so a resume
# that changes one is refused. Keys a stage does not read are left out by the stage (``unread``).
RESUMABLE = {
    "output": "where the artifact goes (a --resume PATH may continue another output's run)",
    "model.device": "where the run computes",
    "training.max_steps": "how long to train; a schedule that depends on the length (cosine, "
    "linear, a fractional warm-up) is laid over the new length from the checkpoint on",
    "training.epochs": "how long to train when max_steps is -1 (as max_steps)",
    "training.logging_steps": "how often metrics are logged",
    "training.log_completions_steps": "how often completions are written",
    "training.save_steps": "how often checkpoints are written",
    "training.save_total_limit": "how many checkpoints are kept",
    "training.report_to": "which trackers receive the metrics",
}
# Manifest fields about the run's execution, not its result: the manifest of a resumed run
# equals an uninterrupted run's except in these (and in RESUMABLE settings it changed).
EXECUTION_FIELDS = {
    "created_at": "when the artifact was written",
    "versions": "the libraries of the call that wrote the artifact",
    "training.wall_s": "wall time of the last call",
    "training.samples_per_s": "throughput of the last call",
    "training.torch_threads": "CPU threads of the last call (they change float sums)",
    "training.samples_per_rank": "samples each process trained on in the last call",
    "training.resumed_from": "the checkpoint the last call continued from",
}
RUN_FILE = "run.json"  # beside recipe.yaml: the process count and what only a fresh start computes


def resume_point(
    ckpts: Path, resume: str | None, settings: dict, unread: tuple[str, ...] = ()
) -> Path | None:
    """The checkpoint to resume from (None: start afresh).

    ``settings``: the run's resolved config as a dict (``to_dict``), as ``begin_checkpoints``
    records it. Resuming is refused, naming every key with both values, when a key outside
    ``RESUMABLE`` differs from the checkpoints' recipe, or the number of processes differs;
    ``unread``: keys or whole sections this stage does not read in this configuration.
    """
    last = get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None
    if resume is None:
        if last is not None:
            raise MemgenError(
                f"{ckpts} holds checkpoints of an unfinished run. Continue it with --resume auto, "
                f"or delete that folder to start over."
            )
        return None
    if resume == "auto":
        point = Path(last) if last else None
    else:
        point = Path(resume)
        if not (point / "trainer_state.json").is_file():
            raise MemgenError(
                f"--resume {resume}: not a checkpoint folder (no trainer_state.json)."
            )
    if point is not None:
        _check_same_run(point.parent, settings, unread)
    return point


def _check_same_run(ckpts: Path, now: dict, unread: tuple[str, ...]) -> None:
    """Resuming with other settings would silently train something else, and record only the
    new values in the artifact's recipe."""
    file = ckpts / "recipe.yaml"
    if not file.exists():
        return
    before, after = _flat(yaml.safe_load(file.read_text()) or {}), _flat(now)
    run = ckpts / RUN_FILE
    if run.exists():  # checkpoints of older versions did not record it
        before["processes"] = json.loads(run.read_text())["world_size"]
        after["processes"] = distributed.info().world_size
    skip = set(RESUMABLE) | set(unread)
    keys = [k for k in {**before, **after} if k not in skip and k.split(".")[0] not in skip]
    old, new = ({k: d.get(k, _ABSENT) for k in keys} for d in (before, after))
    diff = [
        f"  {k}: {_show(old[k])} (checkpoint) vs {_show(new[k])} (now)"
        for k in keys
        if old[k] != new[k]
    ]
    if diff:
        processes = " and as many processes" if old.get("processes") != new.get("processes") else ""
        raise MemgenError(
            f"The checkpoints in {ckpts} were made with other settings, which change what is "
            "trained:\n" + "\n".join(diff) + "\nResume with the checkpoint's values (the same "
            f"flags, or --set KEY=VALUE){processes}, or delete {ckpts} to start over. Only "
            f"{', '.join(RESUMABLE)} may change on resume."
        )


_ABSENT = object()  # a key one side does not have (an older or newer memgen)


def _flat(settings: dict) -> dict:
    """``{"training": {"seed": 0}, "init": None}`` -> ``{"training.seed": 0, "init": None}``."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):  # a section; its own dict-valued keys stay whole
            out |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            out[key] = value
    return out


def _show(value) -> str:
    """A value as ``--set`` takes it (JSON is YAML's flow style, on one line)."""
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def begin_checkpoints(ckpts: Path, cfg, resume_from: Path | None, start: dict) -> dict:
    """Create the checkpoint folder (main process). A fresh run records there what ``--resume``
    compares (the recipe, the number of processes) and ``start``, what only a fresh start
    computes (a held-out score before training); a resumed run returns the ``start`` its
    checkpoints recorded, so that its manifest says what an uninterrupted run's says."""
    ckpts.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        (ckpts / "recipe.yaml").write_text(dump_yaml(cfg))
        run = {"world_size": distributed.info().world_size, "start": start}
        (ckpts / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
        return start
    run = resume_from.parent / RUN_FILE
    return json.loads(run.read_text())["start"] if run.exists() else start


class ResumedIntervals(TrainerCallback):
    """Two gaps of transformers' resume, closed through callback hooks (put it after the
    callbacks that ask for a checkpoint, such as ``StopOnSignal``):

    - a resumed Trainer keeps the checkpoint's logging and save intervals; both may change on
      resume (``RESUMABLE``), so the recipe's apply, as the artifact's recipe says;
    - the loss of steps since the last log is not in a checkpoint, so a resumed run would
      never report it; a log at every checkpoint (and at the last step) puts it there.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control


def mean_loss(log_history: list[dict]) -> float | None:
    """The mean training loss over the run's steps, from the logged losses (each the mean over
    the steps since the previous log): the same after a resume as without one."""
    total, last = 0.0, 0
    for row in log_history:
        if "loss" in row:
            total += row["loss"] * (row["step"] - last)
            last = row["step"]
    return total / last if last else None


def trainer_arguments(
    t: SFTTrainingConfig | GRPOTrainingConfig, ckpts: Path, device: torch.device
) -> dict:
    """The optimizer, schedule, batching, logging and checkpoint settings of a stage
    (``batch_size`` is per device: samples for SFT, completions for TRL's GRPO)."""
    reporters = [r.strip() for r in t.report_to.split(",") if r.strip() != "none"]
    grouped = getattr(t, "group_by_length", False)  # GRPO: TRL's trainer samples prompts itself
    return dict(
        output_dir=str(ckpts),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accumulation,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        train_sampling_strategy="group_by_length" if grouped else "random",
        bf16=t.bf16,
        report_to=reporters or "none",
        disable_tqdm=True,  # RichProgress draws the progress line
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        log_level="passive",  # keep the CLI's quiet library logging
    )


# A GRPO section's sampling and loss settings, named as both grpo-weaver's ``GRPOSettings`` and
# ``trl.GRPOConfig`` (baseline grpo) take them; ``epsilon_high`` is left to each (TRL reads None
# as ``epsilon``).
GRPO_ARGUMENTS = (
    "num_generations",
    "temperature",
    "top_p",
    "max_completion_length",
    "loss_type",
    "scale_rewards",
    "beta",
    "epsilon",
    "num_iterations",
    "mask_truncated_completions",
    "disable_dropout",
)


def grpo_arguments(t: GRPOTrainingConfig) -> dict:
    """``GRPO_ARGUMENTS`` of a GRPO training section, as keyword arguments."""
    return {name: getattr(t, name) for name in GRPO_ARGUMENTS}
