"""GRPOTrainer's parts that stand alone: which rows the loss runs, the reference policy's
weights, the rollouts a checkpoint keeps, gathering across processes, the progress line."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training.trainer_parts import RichProgress, world_size

if TYPE_CHECKING:
    from memgen_cli.training.grpo import GRPOTrainer


POLICY_KEYS = (
    "input_ids",
    "attention_mask",
    "completion_index",
    "completion_mask",
    "prompt_points",
    "inference_points",
)


@contextmanager
def weaver_weights(model: MemGenModel, state: dict[str, torch.Tensor]):
    """Temporarily load ``state`` into the weaver (the reference policy for ``beta`` > 0)."""
    params = model.weaver_parameters()
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def scored_rows(advantages: torch.Tensor, beta: float) -> torch.Tensor:
    """The rows the loss must run: all with ``beta`` > 0 (the KL term needs every row), else
    those with a non-zero advantage, or the first row when none has one (a step still needs
    a graph to back-propagate, and every process must take part in it).

    >>> scored_rows(torch.tensor([0.0, 0.5, 0.0, -0.5]), 0.0).tolist()
    [1, 3]
    >>> scored_rows(torch.tensor([0.0, 0.0]), 0.0).tolist(), scored_rows(torch.zeros(2), 0.1).tolist()
    ([0], [0, 1])
    """
    if beta > 0:
        return torch.arange(len(advantages), device=advantages.device)
    rows = (advantages != 0).nonzero().flatten()
    return rows if len(rows) else rows.new_zeros(1)


def take_policy_rows(inputs: dict, rows: torch.Tensor) -> dict:
    """``POLICY_KEYS`` of ``inputs`` for ``rows`` only (all of them: the same dict's values)."""
    if len(rows) == len(inputs["advantages"]):
        return {k: inputs[k] for k in POLICY_KEYS}
    picked = rows.tolist()
    out = {}
    for key in POLICY_KEYS:
        value = inputs[key]
        if torch.is_tensor(value):
            out[key] = value[rows]
        else:  # per-row lists (insertion points), or None when there are no prompt latents
            out[key] = None if value is None else [value[i] for i in picked]
    return out


def gather_list(values: list) -> list:
    """Every process's list, concatenated in rank order (the list itself on one process)."""
    if world_size() == 1:
        return list(values)
    out: list = [None] * world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def rollouts_file(rank: int) -> str:
    return f"rollouts-{rank}.pt"


class SaveRollouts(TrainerCallback):
    """Writes the generation being trained on into a checkpoint taken before its last step
    (``num_iterations`` > 1), so that a resumed run trains on the same rollouts."""

    def __init__(self, trainer: GRPOTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        t = self.trainer
        if t._buffer is None or state.global_step % t.s.num_iterations == 0:
            return  # the next step generates anew
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            saved = {"buffer": t._buffer, "items": t._buffer_items, "metrics": t._rollout_metrics}
            torch.save(saved, folder / rollouts_file(args.process_index))


@dataclass
class Mark:
    """The two fields of an Insertion that marker rendering reads."""

    token_index: int
    k: int

    @property
    def latents(self) -> torch.Tensor:
        return torch.empty(self.k, 0)


def rounded(x) -> float | None:
    x = float(x)
    return None if x != x else round(x, 4)


class GRPOProgress(RichProgress):
    """The progress line: step, reward ± std, loss, insertions (when logged: not by TRL's
    trainer, as ``baseline grpo`` uses) and length per completion, samples/s, ETA."""

    def __init__(self, clock, console=None):
        super().__init__(clock, console)
        self.last: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.last.update({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})
        super().on_log(args, state, control, logs=logs, **kwargs)

    def _info(self, state) -> str:
        g = lambda key: self.last.get(key, float("nan"))  # noqa: E731
        rate = self.clock.rate(state.global_step)
        ins = f"ins {g('insertions/mean'):.1f}  " if "insertions/mean" in self.last else ""
        return (
            f"reward {g('reward'):.3f}±{g('reward_std'):.3f}  loss {self.loss:.4f}  {ins}"
            f"len {g('completions/mean_length'):.0f}  " + (f"{rate:.2f} samples/s" if rate else "")
        )
