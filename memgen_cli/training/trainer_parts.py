"""Pieces that plug MemGen training into transformers' ``Trainer`` through public hooks.

- ``WeaverObjective``: the module the Trainer trains for weaver SFT (``weave_forward``'s loss);
  its ``state_dict`` is the weaver's trainable tensors only, so checkpoints stay small.

Callbacks, shared by training stages; all use the Trainer's callback hooks and control flags:

- ``RichProgress``: one live line on the main process (step M/N, loss, lr, samples/s, ETA);
  use it with ``disable_tqdm=True``.
- ``MetricsLog``: every log becomes a line of ``metrics.jsonl`` (main process), with samples/s
  and the world size; on resume, lines past the checkpoint's step are dropped first.
- ``StopOnSignal``: the first Ctrl-C (SIGINT) sets ``control.should_save`` and
  ``control.should_training_stop`` at the end of the current optimizer step, so the Trainer
  itself writes a complete, resumable checkpoint and returns; a second Ctrl-C aborts at once.
  With several processes the request is all-reduced each step, so every rank stops together.
- ``SetEpoch``: tells a collator which epoch begins (its random insertion schedule uses it).
"""

from __future__ import annotations

import json
import signal
import time
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import TrainerCallback

from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.training import Points, weave_forward

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])  # as nn.Module's


class WeaverObjective(nn.Module):
    """What the Trainer trains: the woven SFT loss of a MemGen model.

    Its ``state_dict`` is the weaver's trainable tensors only (LoRA + weaver), so Trainer
    checkpoints stay small and never copy the reasoner; ``load_state_dict`` takes them back.
    """

    def __init__(self, model: MemGenModel):
        super().__init__()
        self.memgen = model
        self.samples_seen = 0  # per process: shows that every rank really trained

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        prompt_points=None,
        inference_points=None,
        samples: int | None = None,
    ):
        """``samples``: how many samples the rows hold when it is not one a row (an episode
        split into one row per turn, ``EpisodeCollator``)."""
        points = Points(prompt_points, inference_points)
        out = weave_forward(self.memgen, input_ids, attention_mask, labels, points)
        if self.training:
            self.samples_seen += samples or input_ids.shape[0]
        return {"loss": out.loss}

    def state_dict(self, *args, **kwargs):
        return {n: p.detach().contiguous() for n, p in self.memgen.weaver_parameters().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        params = self.memgen.weaver_parameters()
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        if strict and (missing or unexpected):
            raise RuntimeError(f"weaver state: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, p in params.items():
                if name in state_dict:
                    p.copy_(state_dict[name])
        return LoadResult(missing, unexpected)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Throughput:
    """Samples per second of the current ``train()`` call (after a resume: since the resume)."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.start_time: float | None = None
        self.start_step = 0

    def begin(self, step: int) -> None:
        self.start_time, self.start_step = time.perf_counter(), step

    def rate(self, step: int) -> float | None:
        if self.start_time is None or step <= self.start_step:
            return None
        return (
            (step - self.start_step)
            * self.samples_per_step
            / (time.perf_counter() - self.start_time)
        )


class RichProgress(TrainerCallback):
    def __init__(self, clock: Throughput, console: Console | None = None):
        self.clock, self.console = clock, console or Console()
        self.progress: Progress | None = None
        self.task = None
        self.loss = self.lr = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.begin(state.global_step)
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, info=""
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        self.lr = logs.get("learning_rate", self.lr)
        if self.progress is not None and not self.console.is_terminal and "loss" in logs:
            # A log file gets no live bar: one line per logging step instead.
            self.console.print(
                f"step {state.global_step}/{state.max_steps}  {self._info(state)}", highlight=False
            )

    def _info(self, state) -> str:
        rate = self.clock.rate(state.global_step)
        return f"loss {self.loss:.4f}  lr {self.lr:.2e}  " + (
            f"{rate:.2f} samples/s" if rate else ""
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        self.progress.update(self.task, completed=state.global_step, info=self._info(state))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.on_step_end(args, state, control)
            self.progress.stop()
            self.progress = None


class MetricsLog(TrainerCallback):
    def __init__(self, path: Path, clock: Throughput):
        self.path, self.clock = Path(path), clock

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists() and state.global_step > 0:  # resumed: keep what led here
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= state.global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        row = {"step": state.global_step, **(logs or {}), "world_size": world_size()}
        rate = self.clock.rate(state.global_step)
        if rate is not None and "loss" in row:
            row["samples_per_s"] = round(rate, 4)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class StopOnSignal(TrainerCallback):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: abort without waiting for the step to finish
            raise KeyboardInterrupt
        self.requested = True
        self.console.print(
            "\n[yellow]Ctrl-C: finishing this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)…[/]"
        )

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): no Ctrl-C hook
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.requested
        if world_size() > 1:  # every rank must stop at the same step, or the others hang
            t = torch.tensor([int(flag)], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class SetEpoch(TrainerCallback):
    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)
