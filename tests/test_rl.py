"""The RL core (memgen_cli/training/rl.py) against hand-computed golden values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memgen_cli.data import get_task
from memgen_cli.errors import MemgenError
from memgen_cli.training import rl

# ----------------------------------------------------------------------------- advantages
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])  # two groups of G = 2


def test_group_advantages_divide_by_each_groups_std():
    adv, flat = rl.group_advantages(REWARDS, 2, "group")
    # group 1: mean 0.5, unbiased std sqrt(0.5) = 0.70711; group 2: std 0 -> advantage 0
    expected = [0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4), 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert flat.tolist() == [False, False, True, True]


def test_batch_scaling_uses_the_std_of_all_rewards():
    adv, flat = rl.group_advantages(REWARDS, 2, "batch")
    # all four: mean 0.75, unbiased variance (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5
    torch.testing.assert_close(adv, torch.tensor([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0]))
    assert flat.tolist() == [False] * 4
    # Across processes the stage passes the std of every process's rewards.
    adv, _ = rl.group_advantages(REWARDS, 2, "batch", batch_std=torch.tensor(2.0))
    torch.testing.assert_close(adv, torch.tensor([0.5 / 2.0001, -0.5 / 2.0001, 0.0, 0.0]))


def test_no_scaling_only_centres():
    adv, _ = rl.group_advantages(REWARDS, 2, "none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_unscorable_rows_leave_the_mean_and_get_zero_advantage():
    rewards = torch.tensor([math.nan, 1.0, 0.0, 3.0, 2.0, 1.0])  # G = 3
    adv, _ = rl.group_advantages(rewards, 3, "none")
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.5, -0.5, 1.0, 0.0, -1.0]))


def test_groups_must_divide_the_rewards():
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        rl.group_advantages(REWARDS, 2, "row")


# ----------------------------------------------------------------------------------- loss
# Two rows: row 0 (advantage +1) has its first token's ratio exp(0.2) = 1.2214 above 1 + eps
# (clipped to 1.2), its second at ratio 1; row 1 (advantage -1) has one real token at ratio 1.
LOGPS = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
OLD = torch.tensor([[-1.2, -2.0], [-0.5, -0.1]])
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1], [1, 0]])
# per-token losses: [-1.2, -1.0], [+1.0, (masked)]


@pytest.mark.parametrize(
    "loss_type,kwargs,expected",
    [
        ("grpo", {}, ((-1.2 - 1.0) / 2 + 1.0) / 2),  # per-sequence mean, then mean: -0.05
        ("bnpo", {}, (-1.2 - 1.0 + 1.0) / 3),  # token mean: -0.4
        ("dr_grpo", {"max_completion_length": 4}, (-1.2 - 1.0 + 1.0) / (2 * 4)),  # -0.15
        ("dapo", {}, (-1.2 - 1.0 + 1.0) / 3),  # no window given: this micro-batch's tokens
        ("dapo", {"num_items": 12, "world_size": 2}, (-1.2 - 1.0 + 1.0) / 6),  # 12 over 2 ranks
        ("bnpo", {"grad_accumulation": 2}, (-1.2 - 1.0 + 1.0) / 3 / 2),
        ("grpo", {"grad_accumulation": 2}, -0.05 / 2),
    ],
    ids=["grpo", "bnpo", "dr_grpo", "dapo-local", "dapo-window", "bnpo-accum", "grpo-accum"],
)
def test_each_loss_type_matches_its_golden_value(loss_type, kwargs, expected):
    parts = rl.policy_loss(LOGPS, OLD, ADV, MASK, loss_type=loss_type, **kwargs)
    assert float(parts.loss) == pytest.approx(expected, abs=1e-6)
    assert parts.clip_high == pytest.approx(1 / 3) and parts.clip_low == 0.0
    assert parts.clip_region == pytest.approx(1 / 3) and parts.kl is None


def test_clipped_tokens_get_no_gradient():
    logps = LOGPS.clone().requires_grad_(True)
    rl.policy_loss(logps, OLD, ADV, MASK, loss_type="bnpo").loss.backward()
    # d(-ρA)/dlogp = -ρA: row 0 token 0 is clipped (0), token 1 gives -1/3; row 1 gives +1/3.
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -1 / 3], [1 / 3, 0.0]]))


def test_low_clipping_for_negative_advantages_and_clip_higher():
    logps, old = torch.tensor([[math.log(0.5)]]), torch.tensor([[0.0]])
    parts = rl.policy_loss(logps, old, torch.tensor([-1.0]), torch.ones(1, 1), loss_type="bnpo")
    assert float(parts.loss) == pytest.approx(0.8)  # -min(0.5 * -1, 0.8 * -1)
    assert (parts.clip_low, parts.clip_high) == (1.0, 0.0)
    # epsilon_high widens only the upper side: ratio 1.2214 < 1.28 is not clipped any more.
    parts = rl.policy_loss(LOGPS, OLD, ADV, MASK, loss_type="bnpo", epsilon_high=0.28)
    assert float(parts.loss) == pytest.approx((-math.exp(0.2) - 1.0 + 1.0) / 3, abs=1e-6)
    assert parts.clip_high == 0.0


def test_kl_penalty_uses_the_k3_estimator():
    ref = LOGPS - 0.1  # ref - logp = -0.1 on every token
    k3 = math.exp(-0.1) + 0.1 - 1  # 0.0048374
    parts = rl.policy_loss(LOGPS, OLD, ADV, MASK, loss_type="bnpo", beta=0.1, ref_logps=ref)
    assert float(parts.loss) == pytest.approx((-1.2 - 1.0 + 1.0) / 3 + 0.1 * k3, abs=1e-6)
    assert parts.kl == pytest.approx(k3, abs=1e-7)
    with pytest.raises(ValueError, match="reference"):
        rl.policy_loss(LOGPS, OLD, ADV, MASK, beta=0.1)


def test_first_iteration_ratio_is_one_so_the_loss_is_minus_the_mean_advantage():
    # With num_iterations = 1, old = logp.detach(): loss = -mean(A) over tokens, whatever logp.
    parts = rl.policy_loss(LOGPS, LOGPS, ADV, MASK, loss_type="bnpo")
    assert float(parts.loss) == pytest.approx(-(1 + 1 - 1) / 3)


# -------------------------------------------------------------------------------- rewards
def test_task_reward_is_binary_accuracy_with_trls_signature():
    fn = rl.task_reward(get_task("gsm_symbolic"))
    assert fn.__name__ == "accuracy"
    completions = [
        [{"role": "assistant", "content": "So 3 + 4 = 7.\n#### 7"}],  # conversational
        "The answer is \\boxed{8}.",  # plain
        "I do not know.",
    ]
    values = fn(prompts=["q"] * 3, completions=completions, answer=["7", "7", "7"])
    assert values == [1.0, 0.0, 0.0]


def test_score_weights_skips_none_and_marks_unscorable_rows():
    def a(prompts, completions, **kw):
        return [1.0, 0.0, None]

    def b(prompts, completions, answer, **kw):
        return [0.5, None, None]

    table, total = rl.score([a, b], [1.0, 2.0], ["p"] * 3, ["x", "y", "z"], {"answer": [1, 2, 3]})
    assert table[0].tolist() == [1.0, 0.5] and float(table[1, 0]) == 0.0
    assert math.isnan(table[1, 1]) and torch.isnan(table[2]).all()
    assert total[:2].tolist() == [1.0 + 2 * 0.5, 0.0]  # a None adds nothing
    assert math.isnan(total[2])  # every function skipped it: left out of its group's mean


def _raises(prompts, completions, **kw):
    raise KeyError("gold")


def _short(prompts, completions, **kw):
    return [1.0]


def _text(prompts, completions, **kw):
    return ["yes"] * len(completions)


@pytest.mark.parametrize(
    "fn,message",
    [
        (_raises, "reward function _raises raised KeyError"),
        (_short, "reward function _short returned 1 values for 2 completions"),
        (_text, "reward function _text returned 'yes' for completion 0"),
    ],
)
def test_a_broken_reward_fails_with_one_message_naming_it(fn, message):
    with pytest.raises(MemgenError, match=message):
        rl.score([fn], [1.0], ["p", "q"], ["x", "y"], {})


def test_load_reward_by_import_path():
    assert rl.load_reward("memgen_cli.data.graders:math_accuracy_reward")(
        completions=["#### 4"], answer=["4"]
    ) == [1.0]
    for spec, message in [
        ("nocolon", "expects module:function"),
        ("no_such_module_xyz:f", 'cannot import module "no_such_module_xyz"'),
        ("memgen_cli.data.graders:nope", 'has no function "nope"'),
    ]:
        with pytest.raises(MemgenError, match=message):
            rl.load_reward(spec)


def test_trl_reward_functions_work_unchanged():
    rewards = pytest.importorskip("trl.rewards")
    good = [[{"role": "assistant", "content": "<think>\nhm\n</think>\n4"}]]
    bad = [[{"role": "assistant", "content": "4"}]]
    table, total = rl.score(
        [rewards.think_format_reward],
        [1.0],
        [[{"role": "user", "content": "2+2?"}]] * 2,
        good + bad,
        {"answer": ["4", "4"]},
    )
    assert total.tolist() == [1.0, 0.0]


def test_code_tasks_reward_through_the_sandbox(tmp_path):
    data = tmp_path / "code.jsonl"
    test = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    data.write_text(json.dumps({"question": "Write add(a, b).", "test": test}) + "\n")
    task = get_task("kodcode", path=str(data))
    (example,) = task.load("test")
    fn = rl.task_reward(task)
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    values = fn(prompts=["q", "q"], completions=[good, bad], **rl.example_columns([example] * 2))
    assert values == [1.0, 0.0]
