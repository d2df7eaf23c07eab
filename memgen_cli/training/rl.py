"""The RL core shared by ``grpo-weaver`` and ``train-trigger``: rewards, advantages, the loss.

Why our own loop, and what we take from TRL (1.16, what pip installs here):

- TRL's ``GRPOTrainer`` cannot drive a MemGen policy through public APIs. It scores log-probs
  through a fused LM head (``add_fused_lm_head``) that calls the model's ``base_model``
  directly, so a weaving forward never runs; a ``rollout_func``'s extra fields (our insertion
  points) reach reward functions but not the loss; and the official MemGen code overrides
  private methods of trl 0.21 that no longer exist. So the loop is ours: short, on
  transformers' ``Trainer`` through its public methods (``training/grpo.py``).
- From TRL we take what fits: the reward-function signature
  ``f(prompts, completions, **columns) -> list[float | None]`` (so ``trl.rewards`` functions
  work unchanged; ``None`` means "does not apply to this sample"), the config names
  (``num_generations``, ``loss_type``, ``scale_rewards``, ``beta``, ``epsilon``,
  ``epsilon_high``, ``num_iterations``, ``mask_truncated_completions``), the loss normalisers
  and the metric names (``reward``, ``reward_std``, ``rewards/<fn>/mean``, ...).

Everything here is a plain function of tensors or lists, with golden-value tests
(tests/test_rl.py):

- ``group_advantages``: (r - group mean) / (std + 1e-4), std per group, over the batch, or none;
- ``policy_loss``: the clipped surrogate (PPO/GRPO) with TRL's four aggregations;
- ``task_reward``: a task's own grader as a TRL reward function (binary accuracy), counting
  grader errors (``reward.grader_errors``; too many stop the run);
- ``load_reward`` / ``score``: plug-in rewards ``module:function``, checked on every call;
- ``check_settings``: the checks of a GRPO training + reward section that their types cannot
  express (shared by ``grpo-weaver`` and ``baseline grpo``).

With ``num_iterations`` = 1 the ratio is exactly 1, so the loss shown is about 0 whatever the
policy learns (TRL #2703, #3452): watch ``reward`` and the gradient norm, not the loss.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from memgen_cli.data.base import Example, Task
from memgen_cli.data.graders import completion_text
from memgen_cli.data.gym import GraderErrors, grade_checked
from memgen_cli.errors import MemgenError, require, require_choice

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: keeps a zero-variance group's advantages at 0, not NaN

RewardFn = Callable[..., list]


# ----------------------------------------------------------------------------- advantages
def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaNs (as TRL's ``nanstd``).

    >>> round(float(nanstd(torch.tensor([1.0, 3.0, float("nan")]))), 4)
    1.4142
    """
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    return (var * count / (count - 1)).sqrt()


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", batch_std=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of rewards laid out as consecutive groups of ``group_size``.

    ``scale``: group (divide by each group's std + 1e-4), batch (by the std of all rewards, or
    ``batch_std`` when the batch spans several processes), none (centre only, Dr. GRPO).
    NaN rewards (every reward function returned None) are left out of the group mean and get
    advantage 0. Returns (advantages, whether each row's group has zero std).

    >>> adv, flat = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    >>> [round(a, 3) for a in adv.tolist()], flat.tolist()
    ([0.707, -0.707, 0.0, 0.0], [False, False, True, True])
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    group_std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = batch_std if batch_std is not None else nanstd(rewards)
        std = torch.as_tensor(std, dtype=rewards.dtype).expand_as(rewards)
    else:
        std = group_std
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    flat = torch.isclose(std, torch.zeros_like(std)) | torch.isnan(std)
    return torch.nan_to_num(adv, nan=0.0), flat


# ----------------------------------------------------------------------------------- loss
@dataclass
class LossParts:
    """The loss to back-propagate and what it is made of (masked means, for the metrics)."""

    loss: torch.Tensor
    clip_low: float
    clip_high: float
    clip_region: float
    kl: float | None


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "bnpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    grad_accumulation: int = 1,
    num_items: float | None = None,
    world_size: int = 1,
) -> LossParts:
    """The clipped GRPO objective over completion tokens (B, T), as TRL 1.16 computes it.

    per-token loss = -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A) + β KL, with ρ = exp(logp -
    old_logp) and KL = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator). Aggregation:

    - grpo: mean over each sequence's tokens, then over sequences;
    - bnpo: mean over all tokens of the micro-batch;
    - dr_grpo: sum over tokens / (B * max_completion_length);
    - dapo: sum over tokens / (tokens in the whole accumulation window, all processes) *
      world size (DDP then averages the processes' gradients).

    The first three are divided by ``grad_accumulation`` so an accumulated step averages its
    micro-batches; dapo's normaliser already spans the window (``num_items``).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    mask = mask.to(logps.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference policy's log-probs")
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * per_token_kl
        kl = _masked_mean(per_token_kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accumulation
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / grad_accumulation
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
        loss = loss / grad_accumulation
    else:  # dapo
        items = float(mask.sum()) * grad_accumulation if num_items is None else float(num_items)
        loss = (per_token * mask).sum() / max(items / world_size, 1.0)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return LossParts(
        loss,
        _masked_mean(low.float(), mask),
        _masked_mean(high.float(), mask),
        _masked_mean((low | high).float(), mask),
        kl,
    )


# -------------------------------------------------------------------------------- rewards
def example_columns(examples: Sequence[Example]) -> dict[str, list]:
    """The dataset columns reward functions receive by name (TRL passes every column)."""
    return {
        "id": [e.id for e in examples],
        "question": [e.question for e in examples],
        "answer": [e.answer for e in examples],
        "solution": [e.solution for e in examples],
        "meta": [e.meta for e in examples],
    }


def task_reward(task: Task, name: str = "accuracy") -> RewardFn:
    """The task's own grader as a TRL reward function: 1.0 for a fully correct answer, else 0.

    Completions may be strings or TRL's conversational form (``[{"role": ..., "content":
    ...}]``); the columns are those of ``example_columns`` (``answer`` is required). Partial
    credit (some reasoning-gym scorers) counts as wrong, as accuracy does in ``memgen eval``;
    code tasks run through the task's sandbox. A scorer that raises gives 0 and is counted in
    ``reward.grader_errors`` (a ``GraderErrors`` over the whole run, which GRPO logs); once
    they pass its tolerance the call raises MemgenError and the run stops.
    """
    tally = GraderErrors()

    def reward(prompts, completions, answer, id=None, question=None, solution=None, meta=None, **_):
        n = len(completions)
        examples = [
            Example(
                id=str(id[i]) if id is not None else str(i),
                question=question[i] if question is not None else "",
                answer=answer[i],
                solution=solution[i] if solution is not None else None,
                meta=meta[i] if meta is not None and meta[i] is not None else {},
            )
            for i in range(n)
        ]
        scores = []
        for c, ex in zip(completions, examples, strict=True):
            score, error = grade_checked(task, completion_text(c), ex)
            tally.add(error)
            scores.append(float(score >= 1.0))
        tally.check(task.name)
        return scores

    reward.__name__ = name
    reward.__qualname__ = name
    reward.grader_errors = tally
    return reward


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def load_reward(spec: str) -> RewardFn:
    """``package.module:function`` -> the function (a TRL-signature reward)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise MemgenError(
            f'--reward expects module:function (e.g. my_rewards:length_penalty); got "{spec}".'
        )
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or the module itself failing to import
        raise MemgenError(
            f'--reward {spec}: cannot import module "{module}" ({type(exc).__name__}: {exc}). '
            "Is it on PYTHONPATH?"
        ) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise MemgenError(f'--reward {spec}: module "{module}" has no function "{attr}".')
    return fn


def score(
    funcs: Sequence[RewardFn],
    weights: Sequence[float],
    prompts: list,
    completions: list,
    columns: dict[str, list],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function; returns (per function (N, F), weighted total (N,)).

    ``None`` becomes NaN and is skipped in the weighted sum (TRL's ``nansum``); a row every
    function skipped gets a NaN total (it is then left out of its group's mean, advantage 0).
    A function that raises, returns the wrong number of values, or a non-number fails the run
    with one message naming it (a MemgenError, such as ``task_reward``'s grader-error stop,
    passes through as it is).
    """
    n = len(completions)
    table = torch.full((n, len(funcs)), math.nan)
    for j, fn in enumerate(funcs):
        name = reward_name(fn)
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except MemgenError:
            raise
        except Exception as exc:
            raise MemgenError(
                f"reward function {name} raised {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise MemgenError(
                f"reward function {name} returned {got} values for {n} completions; "
                "it must return one number (or None) per completion."
            )
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue  # does not apply to this completion
            if not isinstance(v, numbers.Real):
                raise MemgenError(
                    f"reward function {name} returned {v!r} for completion {i}; "
                    "rewards must be numbers (or None where the function does not apply)."
                )
            table[i, j] = float(v)
    w = torch.tensor([float(x) for x in weights])
    total = (table * w).nansum(dim=1)
    total[torch.isnan(table).all(dim=1)] = math.nan
    return table, total


# ------------------------------------------------------------------------------- settings
def check_settings(t, r) -> None:
    """Check a ``GRPOTrainingConfig`` (``t``) and ``RewardConfig`` (``r``) beyond their types:
    G >= 2 and the batch a multiple of G, known loss and scaling names, sampling that lets a
    group's completions differ, clipping and iteration ranges, one weight per reward function,
    and reward plug-ins that import. Raises one MemgenError that says how to fix it."""
    g, b = t.num_generations, t.batch_size
    if g < 2:
        raise MemgenError(
            f"training.num_generations must be >= 2 (got {g}): advantages compare the rewards "
            "of a prompt's completions with each other."
        )
    if b < 1 or b % g:
        fits = sorted({g, 2 * g, max(g, b // g * g)})
        raise MemgenError(
            f"training.batch_size ({b}) must be a multiple of training.num_generations ({g}): "
            f"each process answers batch_size / num_generations prompts with {g} completions "
            f"each. Set --set training.batch_size={' or '.join(map(str, fits))}, or change "
            "training.num_generations to a divisor of the batch size."
        )
    check_loss_names(t)
    checks = [
        (
            t.temperature > 0,
            "training.temperature must be > 0: with greedy rollouts a group's completions are "
            "identical and nothing learns",
        ),
        *rollout_checks(t),
        (t.beta >= 0, "training.beta must be >= 0"),
    ]
    require(checks)
    check_rewards(r)


def check_loss_names(t) -> None:
    """A GRPO-style ``training`` section's loss and advantage scaling are ones we know."""
    require_choice("training.loss_type", t.loss_type, LOSS_TYPES)
    require_choice("training.scale_rewards", t.scale_rewards, SCALE_REWARDS)


def rollout_checks(t) -> list[tuple[bool, str]]:
    """The ``errors.require`` checks of a GRPO-style ``training`` section that every RL stage
    shares (grpo-weaver, baseline grpo, train-trigger): rollout sampling mass and length, the
    clipping range, the updates per rollout batch."""
    return [
        (0 < t.top_p <= 1, "training.top_p must be in (0, 1]"),
        (t.max_completion_length >= 1, "training.max_completion_length must be >= 1"),
        (t.epsilon > 0, "training.epsilon must be > 0"),
        (t.epsilon_high is None or t.epsilon_high > 0, "training.epsilon_high must be > 0"),
        (t.num_iterations >= 1, "training.num_iterations must be >= 1"),
    ]


def check_rewards(r) -> None:
    """Check a ``RewardConfig`` (every RL stage's): one weight per reward function, something
    to reward, and reward plug-ins that import (now, not after the model has loaded)."""
    require(
        [
            (
                not r.weights or len(r.weights) == len(r.functions),
                f"reward.weights has {len(r.weights)} values for {len(r.functions)} reward "
                "functions; give one --reward-weight per --reward (or none)",
            ),
            (r.task_weight > 0 or r.functions, "reward.task_weight is 0 and no --reward is given"),
        ]
    )
    for spec in r.functions:
        load_reward(spec)
