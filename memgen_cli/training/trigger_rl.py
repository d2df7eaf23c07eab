"""Trigger RL (paper Eq. 8–9): sampled INVOKE/SKIP decisions, the sparsity penalty, the loss.

The weaver and the reasoner are frozen, so once a rollout is done the input of each decision
(the reasoner's last hidden state at the delimiter, which the head reads) is fixed. We record
it at sampling time; the loss re-applies the head to the recorded states, with no second pass
through the model, so ``num_iterations`` > 1 costs almost nothing.

- ``DecisionSampler``: the ``decide`` hook of ``generation.generate``: at each clause boundary
  below the cap it samples INVOKE with the head's probability and records (state, decision,
  log-prob). Boundaries past the cap are not asked: they are not actions.
- ``trigger_rollout``: G rollouts per prompt (one shared prefill), tokens greedy or sampled.
- ``sparsity_penalty``: λ Σ_j max(0, d_ij − p̄) with p̄ the mean invocation rate of the
  group's rollouts whose task reward is at least the group median.
- ``decision_logprobs`` + ``rl.policy_loss``: the PPO-clipped objective over decisions.
- ``init_head``: an unsaturated start (probability ``rate`` everywhere), so that a group's
  rollouts decide differently and advantages are not all zero (RL.md, "Pitfall").

Under torchrun each process brings its own groups to ``trigger_update``; the head's gradients
are averaged and the loss divided by every process's decisions, so a step equals one process
doing all the groups (see ``trigger_update``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from memgen_cli.config import GenerationConfig, TriggerRLConfig, TriggerTrainingConfig
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.models.trigger import Trigger
from memgen_cli.training import rl
from memgen_cli.training.rollouts import generate_groups
from memgen_cli.training.trainer_parts import world_size


def init_head(trigger: Trigger, rate: float) -> None:
    """Start the head at INVOKE probability ``rate`` for every state, and mark it trained.

    The last layer's weights are zeroed and its bias set to logit(rate): the decision is then a
    fair coin of bias ``rate`` whatever the context, and the first gradient says which states
    should move it (the last layer's weights receive it through the hidden features).
    """
    if not 0 < rate < 1:
        raise ValueError(f"initial invocation rate must be in (0, 1), got {rate}")
    last = trigger.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(rate / (1 - rate)))
        trigger.trained.fill_(True)


# ---------------------------------------------------------------------------- rollouts
TURN_START = -1  # ``Decision.token`` of the decision where an episode's turn begins


@dataclass
class Decision:
    """One trigger decision inside a completion."""

    token_index: int  # completion tokens before the decision point (the delimiter included)
    token: int  # the delimiter token; TURN_START where an episode's turn begins
    prob: float  # INVOKE probability when sampled
    invoke: bool
    logp: float  # log-prob of the decision taken


class DecisionSampler:
    """``decide`` hook for ``generate`` and ``episodes.play``: sample INVOKE ~ Bernoulli(p)
    where eligible, and record; ``token`` None is an episode's turn start (``TURN_START``)."""

    def __init__(self, trigger: Trigger, seed: int):
        self.trigger = trigger
        self.generator: torch.Generator | None = None
        self.seed = seed
        self.states: dict[int, list[torch.Tensor]] = {}
        self.decisions: dict[int, list[Decision]] = {}

    def __call__(self, hidden, eligible, token, emitted) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=hidden.device).manual_seed(self.seed)
        logits = self.trigger.logits(hidden).float()
        u = torch.rand(logits.shape, generator=self.generator, device=logits.device)
        invoke = eligible & (u < torch.sigmoid(logits))
        for r in eligible.nonzero().flatten().tolist():
            act = bool(invoke[r])
            self.states.setdefault(r, []).append(hidden[r].detach().float().cpu())
            self.decisions.setdefault(r, []).append(
                Decision(
                    token_index=int(emitted[r]),
                    token=TURN_START if token is None else int(token[r]),
                    prob=float(torch.sigmoid(logits[r])),
                    invoke=act,
                    logp=float(F.logsigmoid(logits[r] if act else -logits[r])),
                )
            )
        return invoke


@dataclass
class TriggerRollouts:
    """G completions per prompt (rows p*G .. p*G+G-1) and the trigger's decisions in each; on
    games a row is an episode (``training/episode_trigger.py``)."""

    group_size: int
    completion_ids: list[list[int]]  # stop token excluded (what the reward reads)
    finished: list[bool]
    decisions: list[list[Decision]]
    states: list[torch.Tensor]  # per row (decisions, D): the hidden states the head read
    insertions: list[int] = field(default_factory=list)  # inference insertions per row
    episodes: list = field(default_factory=list)  # the played episodes, when rows are episodes

    def invocations(self) -> torch.Tensor:
        return torch.tensor([float(sum(d.invoke for d in row)) for row in self.decisions])

    def num_decisions(self) -> torch.Tensor:
        return torch.tensor([float(len(row)) for row in self.decisions])


@torch.no_grad()
def trigger_rollout(
    model: MemGenModel, messages: list[list[dict]], cfg: GenerationConfig, group_size: int
) -> TriggerRollouts:
    """Answer each chat prompt ``group_size`` times, the trigger sampling its decisions.

    Tokens follow ``cfg`` (greedy when temperature is 0, as the official trigger training);
    decisions are sampled with a generator seeded from ``cfg.seed``.
    """
    sampler = DecisionSampler(model.trigger, cfg.seed + 1)
    _, out = generate_groups(model, messages, cfg, group_size, decide=sampler)
    rows = len(out.tokens)
    width = model.reasoner.config.hidden_size
    return TriggerRollouts(
        group_size=group_size,
        completion_ids=out.tokens,
        finished=out.finished,
        decisions=[sampler.decisions.get(r, []) for r in range(rows)],
        states=[
            torch.stack(sampler.states[r]) if r in sampler.states else torch.zeros(0, width)
            for r in range(rows)
        ],
        insertions=[sum(i.kind == "inference" for i in out.trace.for_row(r)) for r in range(rows)],
    )


def decision_batch(r: TriggerRollouts) -> dict[str, torch.Tensor]:
    """Decisions padded to (N, M): states (N, M, D), actions, mask, sampling log-probs."""
    n, width = len(r.decisions), max((len(d) for d in r.decisions), default=0)
    dim = r.states[0].shape[-1] if r.states else 0
    states = torch.zeros(n, max(width, 1), dim)
    actions = torch.zeros(n, max(width, 1))
    mask = torch.zeros(n, max(width, 1))
    old = torch.zeros(n, max(width, 1))
    for i, (row, s) in enumerate(zip(r.decisions, r.states, strict=True)):
        m = len(row)
        if m:
            states[i, :m] = s
            actions[i, :m] = torch.tensor([float(d.invoke) for d in row])
            mask[i, :m] = 1.0
            old[i, :m] = torch.tensor([d.logp for d in row])
    return {"states": states, "actions": actions, "mask": mask, "old_logps": old}


def decision_logprobs(
    trigger: Trigger, states: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each recorded decision under the head now, and the Bernoulli entropy.

    The head applied to the states recorded at sampling time: no model pass.
    """
    device = trigger.head[0].weight.device  # states are recorded on the CPU; the head may not be
    logits = trigger.logits(states.to(device)).float().to(states.device)
    logps = torch.where(actions.bool(), F.logsigmoid(logits), F.logsigmoid(-logits))
    p = torch.sigmoid(logits)
    entropy = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))
    return logps, entropy


# ----------------------------------------------------------------------------- reward
REFERENCES = ("median", "successful")


def group_median(x: torch.Tensor) -> torch.Tensor:
    """Median of each row of (groups, G): the mean of the two middle values when G is even."""
    s = x.sort(dim=1).values
    g = x.shape[1]
    return (s[:, (g - 1) // 2] + s[:, g // 2]) / 2


def sparsity_penalty(
    rewards: torch.Tensor,
    invocations: torch.Tensor,
    decisions: torch.Tensor,
    group_size: int,
    penalty: float,
    reference: str = "median",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 9: λ Σ_j max(0, d_ij − p̄) for each rollout, and p̄ per rollout.

    p̄ is the mean invocation rate (invocations / decisions) of the rollouts of the same group
    whose task reward is at least the group median (rollouts without decisions have no rate
    and are left out; if none is left, the group's every rollout with decisions counts). With
    ``reference="successful"`` only rollouts with a positive task reward count, and a group
    without one pays no penalty. With
    d ∈ {0, 1} the sum is (1 − p̄) × invocations: a skip is never penalised, and an invocation
    costs less the more often the successful rollouts invoked.

    >>> pen, pbar = sparsity_penalty(
    ...     torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), 2, 1.0)
    >>> pen.tolist(), pbar.tolist()
    ([0.5, 1.0], [0.5, 0.5])
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)
    inv, dec = invocations.view(-1, group_size), decisions.view(-1, group_size)
    has = dec > 0
    rate = torch.where(has, inv / dec.clamp(min=1), torch.zeros_like(inv))
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, not {reference!r}")
    top = (r >= group_median(r)[:, None]) & has
    charged = torch.ones_like(r[:, :1])
    if reference == "successful":
        top = top & (r > 0)
        charged = top.any(dim=1, keepdim=True).to(r.dtype)  # no success: nothing to copy
    top = torch.where(top.any(dim=1, keepdim=True), top, has)
    pbar = (rate * top).sum(1) / top.sum(1).clamp(min=1)
    pen = penalty * (1 - pbar)[:, None] * inv * charged
    return pen.flatten(), pbar.repeat_interleave(group_size)


# ------------------------------------------------------------------------------ update
def _all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``x`` summed (or ``op``) over processes, on the CPU (gloo); ``x`` itself on one."""
    if world_size() == 1:
        return x
    y = x.detach().cpu().clone()
    dist.all_reduce(y, op=op)
    return y


def _everywhere(x: torch.Tensor) -> torch.Tensor:
    """Per-rollout values (..., N) of every process, joined in rank order (equal N each)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def _pooled(value: float, weight: float = 1.0) -> float:
    """The weighted mean of a per-process value over processes (the value on one)."""
    if world_size() == 1:
        return value
    both = _all_reduce(torch.tensor([value * weight, weight], dtype=torch.float64))
    return float(both[0] / both[1]) if both[1] > 0 else 0.0


def average_grads(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over processes (one flat all_reduce).

    A manual all_reduce, not DDP: the loss calls ``Trigger.logits`` rather than ``forward``
    (DDP hooks ``forward``), and the head is a few thousand floats, so one collective of one
    vector per update is all DDP would do here.
    """
    if world_size() == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = _all_reduce(torch.cat([g.flatten().float() for g in grads])) / world_size()
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = part.view_as(p).to(p.device, p.dtype)


def trigger_update(
    trigger: Trigger,
    roll: TriggerRollouts,
    task_rewards: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched,
    t: TriggerTrainingConfig,
    tr: TriggerRLConfig,
) -> tuple[dict, dict]:
    """Penalised rewards, group advantages and ``num_iterations`` clipped updates of the head.

    Every decision of a rollout gets the rollout's advantage (the episode reward goes to each
    decision, as in the paper). Returns (metrics, per-rollout tensors for the completions log).
    With several processes (each with the same number of groups), ``batch`` scaling uses the
    std of all processes' rewards, the loss is normalised by all their decisions, the gradients
    are averaged, and the metrics cover every rollout: the update and the metrics are those of
    one process with all the groups, and every process's head takes the same step.
    """
    g, w = t.num_generations, world_size()
    task_r = torch.nan_to_num(task_rewards.float(), nan=0.0)
    inv, dec = roll.invocations(), roll.num_decisions()
    penalty, pbar = sparsity_penalty(task_r, inv, dec, g, tr.penalty, tr.reference)
    reward = task_r - penalty
    lengths = torch.tensor([float(len(c)) for c in roll.completion_ids])
    every = _everywhere(torch.stack([reward, task_r, penalty, pbar, inv, dec, lengths]))
    batch_std = rl.nanstd(every[0]) if t.scale_rewards == "batch" else None
    adv, flat = rl.group_advantages(reward, g, t.scale_rewards, batch_std)
    b = decision_batch(roll)
    mask = b["mask"]
    total = _all_reduce(mask.sum())  # decisions of every process
    share = total.clamp(min=1.0) / w  # the loss divides by this: all decisions, per process
    width = int(_all_reduce(torch.tensor(mask.shape[1]), dist.ReduceOp.MAX))
    params = list(trigger.parameters())
    for _ in range(t.num_iterations):
        logps, entropy = decision_logprobs(trigger, b["states"], b["actions"])
        parts = rl.policy_loss(
            logps,
            b["old_logps"],
            adv,
            mask,
            loss_type=t.loss_type,
            epsilon_low=t.epsilon,
            epsilon_high=t.epsilon if t.epsilon_high is None else t.epsilon_high,
            max_completion_length=width,
        )
        loss = parts.loss
        if t.loss_type in ("bnpo", "dapo") and w > 1:  # divided by our decisions: by all instead
            loss = loss * mask.sum().clamp(min=1.0) / share
        ent = (entropy * mask).sum() / share
        loss = loss - tr.entropy_coef * ent
        opt.zero_grad()
        loss.backward()
        average_grads(params)
        limit = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        opt.step()
        sched.step()
    reward, task_r_all, pen_all, pbar_all, inv_all, dec_all, len_all = every
    n = max(every.shape[1], 1)
    metrics = {
        "reward": float(reward.mean()),
        "task_reward": float(task_r_all.mean()),
        "penalty": float(pen_all.mean()),
        "invocation_rate": float(inv_all.sum() / dec_all.sum()) if dec_all.sum() > 0 else None,
        "p_bar": float(pbar_all.mean()),
        "decisions_per_completion": float(dec_all.sum()) / n,
        "invocations_per_completion": float(inv_all.sum()) / n,
        "entropy": _pooled(float(ent.detach())),
        "clip_ratio": _pooled(parts.clip_region, float(mask.sum())),
        "frac_reward_zero_std": float(_everywhere(flat.float()).mean()),
        "completion_length": float(len_all.sum()) / n,
        "loss": _pooled(float(loss.detach())),
        "grad_norm": float(norm),
    }
    return metrics, {"task_reward": task_r, "penalty": penalty, "advantage": adv}
