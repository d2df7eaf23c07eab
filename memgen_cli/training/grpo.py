"""GRPO on transformers' ``Trainer``, through its public methods only.

One optimizer step, on each process (each process owns whole groups of G completions):

1. ``get_batch_samples`` (public): take the step's micro-batches of prompts from the Trainer's
   sampler and turn them into rollouts: G completions per prompt with latents woven
   (``training/rollouts.py``), rewards (``rl.score``), group-normalised advantages
   (``rl.group_advantages``), and, when ``num_iterations`` > 1 or ``beta`` > 0, the old and
   reference log-probs. The rollouts of one generation are reused for ``num_iterations``
   consecutive steps (the prompts drawn for those steps are skipped). A checkpoint taken
   between those steps holds them (``rollouts-<rank>.pt``, ``SaveRollouts``) and a run resumed
   from it trains on them, so it is the uninterrupted run (TRL regenerates them: #3247).
2. ``compute_loss`` (public): the policy's log-probs of the sampled tokens from the batched
   training forward at the trace's exact insertion points, then ``rl.policy_loss``; already
   normalised for gradient accumulation (``loss_is_scaled_for_ga``). With ``beta`` = 0 a
   completion whose advantage is 0 (its group's rewards all equal: most groups on a task the
   policy finds all-easy or all-hard) adds nothing to the gradient, so only the other rows run
   the training forward (``scored_rows``); the skipped rows keep their place in every
   normaliser, with ratio 1, so the loss and its gradient are those of the full batch
   (tests/test_grpo.py), at the cost of the informative rows only. ``entropy`` and
   ``logp_diff`` are then measured on the rows that ran.
3. ``log`` (public): TRL's metric names, averaged since the last log, plus ``insertions/mean``
   and ``logp_diff/mean|max`` (training-forward vs sampling-time log-probs: the check that
   rollout and loss see the same policy).

What a kind of rollout decides is in five hooks (``_rollout``: sample a micro-batch's groups;
``_rewards``: score them; ``_policy_batch``: what the loss reads; ``policy_rows``: the scorer's
arguments for some rows; ``_completion``: a row's own part of the completions log) and the
objective's scorer (``PolicyObjective``). Here they are single completions; an episode of a
text game is another kind (``training/episode_grpo.py``).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from transformers import Trainer

from memgen_cli.config import GenerationConfig
from memgen_cli.data import Example, to_messages
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.rendering import segments
from memgen_cli.training import rl
from memgen_cli.training.grpo_parts import (
    POLICY_KEYS,
    Mark,
    SaveRollouts,
    gather_list,
    rollouts_file,
    rounded,
    scored_rows,
    take_policy_rows,
    weaver_weights,
)
from memgen_cli.training.rollouts import Rollouts, policy_inputs, policy_logprobs, rollout
from memgen_cli.training.trainer_parts import WeaverObjective, world_size

CLIPPED_WARN = 0.9  # completions/clipped_ratio at or above this, three logs running: warn


@dataclass
class GRPOSettings:
    """What the loop needs from the stage's config (names as in TRL)."""

    num_generations: int
    temperature: float
    top_p: float
    max_completion_length: int
    memory: str
    loss_type: str
    scale_rewards: str
    beta: float
    epsilon: float
    epsilon_high: float
    num_iterations: int
    mask_truncated_completions: bool
    disable_dropout: bool
    seed: int
    log_completions_steps: int
    prompt_suffix: str
    system: str | None


class PolicyObjective(WeaverObjective):
    """What the Trainer trains for GRPO: per-token log-probs of rollouts under the woven policy,
    from ``scorer(model, temperature=..., **batch) -> (logps, entropy)`` (``policy_logprobs``
    for completions; ``episode_logprobs`` for episodes).

    Checkpoints hold the weaver's trainable tensors only (``WeaverObjective.state_dict``).
    """

    def __init__(self, model: MemGenModel, scorer: Callable = policy_logprobs):
        super().__init__(model)
        self.scorer = scorer

    def forward(self, temperature: float = 1.0, **batch):
        logps, entropy = self.scorer(self.memgen, temperature=temperature, **batch)
        if self.training:
            self.samples_seen += logps.shape[0]
        return {"logps": logps, "entropy": entropy}


class GRPOTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss applies TRL's normalisers itself

    def __init__(
        self,
        *,
        policy: MemGenModel,
        examples: list[Example],
        reward_funcs: list[Callable],
        reward_weights: list[float],
        settings: GRPOSettings,
        completions_dir: Path | None = None,
        console: Console | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.policy, self.examples, self.s = policy, examples, settings
        self.reward_funcs, self.reward_weights = reward_funcs, reward_weights
        self.completions_dir = completions_dir
        self.console = console or Console(stderr=True)
        self.reference = None
        if settings.beta > 0:  # the starting weaver: small tensors, the base weights stay shared
            self.reference = {n: p.detach().clone() for n, p in policy.weaver_parameters().items()}
        self._buffer: list[dict] | None = None
        self._rollout_metrics: dict[str, list[float]] = {}
        self._buffer_items = 0
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._clipped_runs = 0
        self._warned = False
        self.add_callback(SaveRollouts(self))

    # ------------------------------------------------------------------- 0. resume
    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; resumed from a checkpoint taken between the steps of one
        generation, it first takes back that generation's rollouts (``SaveRollouts``)."""
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / rollouts_file(self.args.process_index)
            if path.is_file():
                # Our own file in the run's checkpoint: the stage's objects (an episode batch
                # is a dataclass), so not weights_only.
                saved = torch.load(path, map_location=self.policy.device, weights_only=False)
                self._buffer, self._buffer_items = saved["buffer"], saved["items"]
                self._rollout_metrics = saved["metrics"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------------ 1. rollouts
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        step = self.state.global_step  # steps done so far; this one is step + 1
        if self._buffer is None or step % self.s.num_iterations == 0:
            before = {k: len(v) for k, v in self._metrics.items()}
            self._buffer = self._generate(batches, step)
            # What the rollouts measured, logged again with every step that trains on them.
            self._rollout_metrics = {
                k: v[before.get(k, 0) :]
                for k, v in self._metrics.items()
                if not k.startswith("timing/")  # no new rollout time on the reuse steps
            }
        else:
            for key, values in self._rollout_metrics.items():
                self._metrics[key] += values
            local = sum(int(b["loss_mask"].sum()) for b in self._buffer)
            total = torch.tensor(float(local))
            if world_size() > 1:
                dist.all_reduce(total)
            self._buffer_items = float(total)
        return [{**b, "iteration": step % self.s.num_iterations} for b in self._buffer], (
            self._buffer_items
        )

    def _generate(self, batches: list[dict], step: int) -> list[dict]:
        s, model = self.s, self.policy
        rank = self.args.process_index
        was_training = model.training
        started = time.perf_counter()
        rolls: list[Rollouts] = []
        chosen: list[list[Example]] = []
        for micro, batch in enumerate(batches):
            exs = [self.examples[int(i)] for i in batch["index"].tolist()]
            cfg = GenerationConfig(
                max_new_tokens=s.max_completion_length,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=((s.seed * 1_000_003 + step) * 1009 + rank) * 31 + micro,
                memory=s.memory,
            )
            rolls.append(self._rollout(exs, cfg))
            chosen.append(exs)
        model.train(was_training)
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        G = s.num_generations
        tables, totals, rows = [], [], []
        for roll, exs in zip(rolls, chosen, strict=True):
            group = [e for e in exs for _ in range(G)]
            table, total = self._rewards(roll, group)
            tables.append(table)
            totals.append(total)
            rows.append(group)
        rewards = torch.cat(totals)
        all_rewards = torch.tensor(gather_list(rewards.tolist()))
        batch_std = rl.nanstd(all_rewards) if s.scale_rewards == "batch" else None
        adv, flat = rl.group_advantages(rewards, G, s.scale_rewards, batch_std)
        score_s = time.perf_counter() - started

        out, offset = [], 0
        for roll in rolls:
            n = len(roll.completion_ids)
            b = self._policy_batch(roll)
            b["advantages"] = adv[offset : offset + n].to(model.device)
            if s.num_iterations > 1:
                b["old_logps"] = self._old_logps(b)
            if self.reference is not None:
                with weaver_weights(model, self.reference):
                    b["ref_logps"] = self._score(b)
            out.append(b)
            offset += n
        self._record_rollouts(rolls, tables, rewards, all_rewards, flat, rollout_s, score_s)
        if self._should_log_completions(step + 1):
            self._log_completions(step + 1, rows, rolls, tables, rewards, adv)
        return out

    # The hooks a kind of rollout fills (episodes: training/episode_grpo.py).
    def _rollout(self, exs: list[Example], cfg: GenerationConfig) -> Rollouts:
        """G sampled completions of each example's prompt."""
        s = self.s
        messages = [to_messages(e, s.prompt_suffix, s.system) for e in exs]
        return rollout(self.policy, messages, cfg, s.num_generations)

    def _rewards(self, roll: Rollouts, group: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rl.score`` of the rollouts (``group``: each row's example): (per function, total)."""
        s = self.s
        prompts = [to_messages(e, s.prompt_suffix, s.system) for e in group]
        text = self.policy.tokenizer.batch_decode(roll.texts_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in text]
        columns = {**rl.example_columns(group), "completion_ids": roll.texts_ids}
        return rl.score(self.reward_funcs, self.reward_weights, prompts, completions, columns)

    def _policy_batch(self, roll: Rollouts) -> dict:
        """What the loss reads of the rollouts, on the device: the policy's inputs, and per
        row and token ``completion_mask``, ``sampling_logps`` and ``loss_mask``."""
        b = policy_inputs(roll, self.policy.tokenizer.pad_token_id)
        loss_mask = b["completion_mask"].clone()
        if self.s.mask_truncated_completions:
            loss_mask[~torch.tensor(roll.finished)] = 0
        b["loss_mask"] = loss_mask
        return {k: v.to(self.policy.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def policy_rows(self, inputs: dict, rows: torch.Tensor | None = None) -> dict:
        """The scorer's arguments for ``rows`` of a batch (None: all of them)."""
        if rows is None:
            return {k: inputs[k] for k in POLICY_KEYS}
        return take_policy_rows(inputs, rows)

    def _completion(self, roll: Rollouts, r: int, ex: Example) -> tuple[dict, int]:
        """Rollout ``r``'s own part of its completions-log record (``ex`` its example): the
        prompt and the completion, ⟨mem K⟩ where memory went in; and its insertion count."""
        ids, points = roll.texts_ids[r], roll.inference_points[r]
        marks = [Mark(t, self.policy.cfg.inference_latents) for t in points]
        text = "".join(p for _, p in segments(self.policy.tokenizer, ids, marks))
        return {"prompt": ex.question, "completion": text}, len(points)

    def _old_logps(self, b: dict) -> torch.Tensor:
        """The sampling policy's log-probs for ``num_iterations`` > 1. In fp32 without dropout
        they are the sampling-time log-probs (the training forward equals them within 1e-4:
        ``logp_diff``, tests/test_grpo.py), so no scoring pass over the whole batch; in half
        precision (where cached decoding and the batched forward round differently) or with
        dropout on, the training forward recomputes them, as TRL does."""
        exact = self.policy.dtype == torch.float32 and self.s.disable_dropout
        return b["sampling_logps"].to(torch.float32) if exact else self._score(b)

    @torch.no_grad()
    def _score(self, b: dict) -> torch.Tensor:
        was = self.policy.training
        self.policy.train(not self.s.disable_dropout)
        scorer = self.model.scorer if isinstance(self.model, PolicyObjective) else policy_logprobs
        logps, _ = scorer(self.policy, temperature=self.s.temperature, **self.policy_rows(b))
        self.policy.train(was)
        return logps

    # -------------------------------------------------------------------------- 2. loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.s
        if s.disable_dropout:
            model.eval()  # LoRA dropout off: the loss sees the policy that sampled (TRL default)
        rows = scored_rows(inputs["advantages"], s.beta)
        out = model(temperature=s.temperature, **self.policy_rows(inputs, rows))
        part, entropy = out["logps"], out["entropy"]
        real = inputs["completion_mask"][rows].to(part.dtype)
        old = inputs.get("old_logps")
        if len(rows) == len(inputs["advantages"]):
            logps = part
            old = logps.detach() if old is None else old
        else:  # skipped rows: ratio 1 and advantage 0, so they add 0 but count in normalisers
            if old is None:  # one iteration: the old policy is this one
                old = inputs["sampling_logps"].to(part.dtype).index_copy(0, rows, part.detach())
            logps = old.index_copy(0, rows, part)
        parts = rl.policy_loss(
            logps,
            old,
            inputs["advantages"],
            inputs["loss_mask"],
            loss_type=s.loss_type,
            epsilon_low=s.epsilon,
            epsilon_high=s.epsilon_high,
            beta=s.beta,
            ref_logps=inputs.get("ref_logps"),
            max_completion_length=s.max_completion_length,
            grad_accumulation=self.current_gradient_accumulation_steps,
            num_items=num_items_in_batch,
            world_size=world_size(),
        )
        m = self._metrics
        m["entropy"].append(float((entropy * real).sum() / real.sum().clamp(min=1)))
        m["clip_ratio/low_mean"].append(parts.clip_low)
        m["clip_ratio/high_mean"].append(parts.clip_high)
        m["clip_ratio/region_mean"].append(parts.clip_region)
        if parts.kl is not None:
            m["kl"].append(parts.kl)
        if inputs["iteration"] == 0:  # parameters as at sampling: the two must agree
            gap = (part.detach() - inputs["sampling_logps"][rows]).abs() * real
            m["logp_diff/mean"].append(float(gap.sum() / real.sum().clamp(min=1)))
            m["logp_diff/max"].append(float(gap.max()))
        return (parts.loss, out) if return_outputs else parts.loss

    # --------------------------------------------------------------------------- 3. logs
    def _record_rollouts(self, rolls, tables, rewards, all_rewards, flat, rollout_s, score_s):
        m = self._metrics
        lengths = [len(c) for r in rolls for c in r.completion_ids]
        clipped = [not f for r in rolls for f in r.finished]
        inserts = [len(p) for r in rolls for p in r.inference_points]
        lengths, clipped, inserts = map(gather_list, (lengths, clipped, inserts))
        flat = gather_list(flat.tolist())
        table = torch.tensor(gather_list(torch.cat(tables).tolist()))
        m["reward"].append(float(torch.nanmean(all_rewards)))
        m["reward_std"].append(float(rl.nanstd(all_rewards)))
        for j, fn in enumerate(self.reward_funcs):
            name = rl.reward_name(fn)
            m[f"rewards/{name}/mean"].append(float(torch.nanmean(table[:, j])))
            m[f"rewards/{name}/std"].append(float(rl.nanstd(table[:, j])))
            if (tally := getattr(fn, "grader_errors", None)) is not None:  # so far, all ranks
                m[f"rewards/{name}/grader_errors"].append(sum(gather_list([len(tally.errors)])))
        m["frac_reward_zero_std"].append(sum(flat) / len(flat))
        m["completions/mean_length"].append(sum(lengths) / len(lengths))
        m["completions/min_length"].append(min(lengths))
        m["completions/max_length"].append(max(lengths))
        m["completions/clipped_ratio"].append(sum(clipped) / len(clipped))
        m["insertions/mean"].append(sum(inserts) / len(inserts))
        m["timing/rollout_s"].append(rollout_s)
        m["timing/reward_s"].append(score_s)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (not the end-of-training summary)
            for key, values in self._metrics.items():
                if values:
                    last = key.endswith(("/max", "/grader_errors"))  # a peak, a running count
                    logs[key] = max(values) if last else sum(values) / len(values)
            self._metrics.clear()
            self._watch_clipping(logs.get("completions/clipped_ratio"))
        super().log(logs, start_time)

    def _watch_clipping(self, ratio: float | None) -> None:
        """The official code's failure mode: completions always hit the length limit."""
        self._clipped_runs = self._clipped_runs + 1 if (ratio or 0) >= CLIPPED_WARN else 0
        if self._clipped_runs >= 3 and not self._warned and self.args.process_index == 0:
            self._warned = True
            self.console.print(
                f"[yellow]warning:[/] completions/clipped_ratio has stayed >= {CLIPPED_WARN} for "
                f"{self._clipped_runs} logs: almost every completion hits max_completion_length "
                f"({self.s.max_completion_length}), so rewards and advantages come from cut-off "
                "answers. Raise training.max_completion_length or lower "
                "memory.max_inference_insertions."
            )

    def _should_log_completions(self, step: int) -> bool:
        n = self.s.log_completions_steps
        return self.completions_dir is not None and n > 0 and (step == 1 or step % n == 0)

    def _log_completions(self, step, rows, rolls, tables, rewards, adv):
        names = [rl.reward_name(f) for f in self.reward_funcs]
        records, i = [], 0
        for group, roll, table in zip(rows, rolls, tables, strict=True):
            for r, ex in enumerate(group):
                fields, insertions = self._completion(roll, r, ex)
                records.append(
                    {
                        "id": ex.id,
                        **fields,
                        "rewards": {n: rounded(table[r, j]) for j, n in enumerate(names)},
                        "reward": rounded(rewards[i]),
                        "advantage": round(float(adv[i]), 4),
                        "insertions": insertions,
                        "finished": roll.finished[r],
                    }
                )
                i += 1
        records = gather_list(records)
        if self.args.process_index == 0:
            self.completions_dir.mkdir(parents=True, exist_ok=True)
            path = self.completions_dir / f"step_{step:05d}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
