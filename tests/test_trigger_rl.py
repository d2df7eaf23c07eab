"""Trigger RL core: the sparsity penalty and advantages against hand-computed values, sampled
decisions and their re-scoring, and a synthetic problem the trigger must learn."""

from __future__ import annotations

import pytest
import torch

from conftest import make_memgen
from helpers import chats
from memgen_cli.config import GenerationConfig, TriggerRLConfig, TriggerTrainingConfig
from memgen_cli.training import rl
from memgen_cli.training.trigger_rl import (
    decision_batch,
    decision_logprobs,
    group_median,
    init_head,
    sparsity_penalty,
    trigger_rollout,
    trigger_update,
)

MESSAGES = chats("Hi there, what is 2+2?", "Yo, say a word.")

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------ golden values
def test_group_median_averages_the_two_middle_values():
    assert group_median(t(0, 1, 1, 0).view(1, 4)).tolist() == [0.5]
    assert group_median(t(3, 1, 2).view(1, 3)).tolist() == [2.0]


def test_penalty_uses_the_rate_of_rollouts_at_or_above_the_median():
    # median 0.5: rows 0 and 2 succeed, rates 1/2 and 3/4 -> p̄ = 0.625; λ = 2.
    # Row 0 decided [1, 0]: Σ max(0, d − p̄) = 0.375 -> 0.75.
    pen, pbar = sparsity_penalty(t(1, 0, 1, 0), t(1, 2, 3, 0), t(2, 2, 4, 0), 4, 2.0)
    torch.testing.assert_close(pen, t(0.75, 1.5, 2.25, 0.0))
    torch.testing.assert_close(pbar, t(0.625, 0.625, 0.625, 0.625))


def test_penalty_counts_ties_at_the_median_as_successful():
    # rewards [1, 1, 1, 0]: median 1; rows 0-2 (ties) set p̄ = (1 + 0 + 0.5) / 3 = 0.5.
    pen, pbar = sparsity_penalty(t(1, 1, 1, 0), t(1, 0, 2, 3), t(1, 1, 4, 3), 4, 1.0)
    torch.testing.assert_close(pen, t(0.5, 0.0, 1.0, 1.5))
    assert pbar.tolist() == [0.5] * 4


def test_penalty_and_advantages_when_all_task_rewards_are_equal():
    # Every row is at the median: p̄ = mean(0, .5, 1, 1) = 0.625; penalty 0.375 per invocation.
    pen, _ = sparsity_penalty(t(0, 0, 0, 0), t(0, 1, 2, 2), t(2, 2, 2, 2), 4, 1.0)
    torch.testing.assert_close(pen, t(0.0, 0.375, 0.75, 0.75))
    adv, flat = rl.group_advantages(-pen, 4)
    # r = [0, -.375, -.75, -.75], mean -.46875, unbiased std sqrt(.38671875 / 3) = .359035
    std = (0.38671875 / 3) ** 0.5 + 1e-4
    torch.testing.assert_close(adv, t(0.46875, 0.09375, -0.28125, -0.28125) / std)
    assert not flat.any()
    # With λ = 0 equal rewards give zero advantages (and nothing learns), as in GRPO.
    pen0, _ = sparsity_penalty(t(0, 0, 0, 0), t(0, 1, 2, 2), t(2, 2, 2, 2), 4, 0.0)
    adv0, flat0 = rl.group_advantages(-pen0, 4)
    assert adv0.tolist() == [0.0] * 4 and flat0.all()


def test_penalty_with_successful_reference_spares_groups_where_nothing_succeeded():
    # Group 1: no rollout succeeded -> no penalty (p̄ still reported: mean rate 0.625).
    # Group 2: every rollout succeeded -> as the median reference: 0.375 per invocation.
    # Group 3: rows 0, 2 succeeded (rates 1/2, 3/4 -> p̄ 0.625), λ 1: 0.375 per invocation.
    rewards = t(0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0)
    inv, dec = t(0, 1, 2, 2, 0, 1, 2, 2, 1, 2, 3, 0), t(2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 0)
    pen, pbar = sparsity_penalty(rewards, inv, dec, 4, 1.0, "successful")
    torch.testing.assert_close(pen, t(0, 0, 0, 0, 0, 0.375, 0.75, 0.75, 0.375, 0.75, 1.125, 0))
    torch.testing.assert_close(pbar, t(*[0.625] * 12))
    adv, _ = rl.group_advantages(rewards - pen, 4, "none")
    assert adv[:4].tolist() == [0.0] * 4  # all failed: nothing to learn, nothing pushed down
    median, _ = sparsity_penalty(rewards, inv, dec, 4, 1.0)
    assert median[:4].tolist() == [0.0, 0.375, 0.75, 0.75]  # the median reference charges them
    with pytest.raises(ValueError, match="reference"):
        sparsity_penalty(rewards, inv, dec, 4, 1.0, "best")


def test_penalty_with_rows_without_decisions():
    # The successful rows 0, 1 made no decisions: p̄ falls back to the rows with decisions.
    pen, pbar = sparsity_penalty(t(1, 1, 0, 0), t(0, 0, 1, 2), t(0, 0, 2, 2), 4, 1.0)
    torch.testing.assert_close(pen, t(0.0, 0.0, 0.25, 0.5))
    assert pbar.tolist() == [0.75] * 4
    # A group without any decision: no penalty; groups are independent of each other.
    # Second group: p̄ = row 2's rate 1/2; row 3 invoked twice: 2 × (1 − 0.5).
    pen, pbar = sparsity_penalty(t(1, 0, 1, 0), t(0, 0, 1, 2), t(0, 0, 2, 2), 2, 1.0)
    torch.testing.assert_close(pen, t(0.0, 0.0, 0.5, 1.0))
    assert pbar.tolist() == [0.0, 0.0, 0.5, 0.5]


def test_init_head_is_unsaturated_at_the_chosen_rate():
    mg = make_memgen("llama")
    init_head(mg.trigger, 0.3)
    assert mg.trigger.is_trained
    p = mg.trigger.probability(torch.randn(5, mg.reasoner.config.hidden_size) * 10)
    torch.testing.assert_close(p, torch.full((5,), 0.3))
    with pytest.raises(ValueError):
        init_head(mg.trigger, 1.0)


# ---------------------------------------------------------------------------- rollouts
def randomised(seed=0, **memory):
    mg = make_memgen("llama", **memory)
    init_head(mg.trigger, 0.5)
    torch.manual_seed(seed)
    with torch.no_grad():
        mg.trigger.head[-1].weight.normal_(0, 1.0)  # probabilities that vary with the state
    return mg


def test_rescored_logprobs_equal_the_sampling_time_ones():
    mg = randomised()
    cfg = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=1, memory="full")
    roll = trigger_rollout(mg, MESSAGES, cfg, 4)
    b = decision_batch(roll)
    assert b["mask"].sum() >= 8  # enough decisions for the check to mean something
    with torch.no_grad():
        logps, _ = decision_logprobs(mg.trigger, b["states"], b["actions"])
    real = b["mask"].bool()
    torch.testing.assert_close(logps[real], b["old_logps"][real], atol=1e-6, rtol=0)
    probs = torch.tensor([d.prob for row in roll.decisions for d in row])
    assert float(probs.std()) > 0.1  # the head reads the state
    # Sampled, not thresholded: some decisions went against the more likely choice.
    assert any(d.invoke != (d.prob >= 0.5) for row in roll.decisions for d in row)


def test_decisions_match_the_trace_and_stop_at_the_cap():
    cap = 2
    mg = randomised(max_inference_insertions=cap)
    cfg = GenerationConfig(max_new_tokens=32, temperature=1.0, seed=2, memory="full")
    roll = trigger_rollout(mg, MESSAGES, cfg, 4)
    assert roll.insertions == roll.invocations().long().tolist()  # each INVOKE wove latents
    capped = 0
    for row in roll.decisions:
        assert sum(d.invoke for d in row) <= cap
        if sum(d.invoke for d in row) == cap:  # no decision once the cap is reached
            assert row[-1].invoke
            capped += 1
        assert [d.token_index for d in row] == sorted({d.token_index for d in row})
    assert capped and any(not d.invoke for row in roll.decisions for d in row)


def test_greedy_tokens_still_give_a_group_different_decisions():
    mg = randomised()
    roll = trigger_rollout(mg, MESSAGES, GenerationConfig(max_new_tokens=48, memory="full"), 4)
    groups = [[tuple(d.invoke for d in row) for row in roll.decisions[g : g + 4]] for g in (0, 4)]
    assert any(len(set(group)) > 1 for group in groups), groups


# ---------------------------------------------------------------------------- learning
VOWELS = {"a", "e", "o"}  # delimiters where invoking pays; at the others skipping pays


def decision_reward(mg, roll) -> torch.Tensor:
    """+1 for each INVOKE after a vowel, -1 for each INVOKE after any other delimiter."""
    tok = mg.tokenizer
    return torch.tensor(
        [
            float(sum((1 if tok.decode([d.token]) in VOWELS else -1) for d in row if d.invoke))
            for row in roll.decisions
        ]
    )


def accuracy(mg, seed: int) -> tuple[float, float]:
    """How often the head's likelier choice is right, on fresh rollouts: (after a vowel,
    after another delimiter). A constant policy gets 0 on one of them."""
    tok, pairs = mg.tokenizer, []
    for s in range(seed, seed + 3):
        cfg = GenerationConfig(max_new_tokens=48, temperature=1.0, seed=s, memory="full")
        roll = trigger_rollout(mg, MESSAGES, cfg, 8)
        pairs += [
            (d.prob >= 0.5, tok.decode([d.token]) in VOWELS) for r in roll.decisions for d in r
        ]
    assert len(pairs) >= 50, len(pairs)
    vowel = [a for a, b in pairs if b]
    other = [not a for a, b in pairs if not b]
    return sum(vowel) / len(vowel), sum(other) / len(other)


def test_the_trigger_learns_where_invoking_pays():
    mg = make_memgen("llama", max_inference_insertions=50)
    with torch.no_grad():  # attention and MLP outputs small: the last hidden state carries the
        for name, p in mg.reasoner.named_parameters():  # current token (as in a trained LM)
            if "o_proj" in name or "down_proj" in name:
                p.mul_(0.05)
    mg.set_trainable(weaver=False, trigger=True)
    init_head(mg.trigger, 0.5)
    weaver_before = {k: v.clone() for k, v in mg.weaver_parameters().items()}
    reasoner_before = {k: v.clone() for k, v in mg.reasoner.state_dict().items()}
    t_cfg = TriggerTrainingConfig(num_generations=8, learning_rate=0.02, num_iterations=2)
    tr_cfg = TriggerRLConfig(penalty=0.0)
    opt = torch.optim.AdamW(mg.trigger.parameters(), lr=t_cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    before = accuracy(mg, seed=1000)
    for step in range(15):
        cfg = GenerationConfig(max_new_tokens=32, temperature=1.0, seed=step, memory="full")
        roll = trigger_rollout(mg, MESSAGES, cfg, 8)
        trigger_update(mg.trigger, roll, decision_reward(mg, roll), opt, sched, t_cfg, tr_cfg)
    after = accuracy(mg, seed=1000)
    # From one side always wrong to both mostly right (0.86 to 1.0 over four seed offsets).
    assert min(before) < 0.5 and min(after) >= 0.85, (before, after)
    for k, v in mg.weaver_parameters().items():
        assert torch.equal(v, weaver_before[k]), k
    for k, v in mg.reasoner.state_dict().items():
        assert torch.equal(v, reasoner_before[k]), k
