"""`memgen grpo-weaver`: rollouts, log-prob agreement, learning, artifact, resume, errors.

Fast tests use a 2-layer Llama saved to a temporary directory (``--base DIR``) and a small
GSM8K-format JSONL; the slow ones use the embedded SmolLM2 model and torchrun. The golden
values of the RL core itself are in tests/test_rl.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import zlib
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import multiprocessing as mp
from transformers import set_seed
from typer.testing import CliRunner

from conftest import make_memgen
from helpers import (
    BROKEN_REWARD_OUTPUTS,
    TARGET,
    Capture,
    assert_broken_reward_leaves_folders,
    chats,
    files,
    plain_names,
    rows,
    tiny_config,
    write_problems,
)
from helpers import WEAVER_ARTIFACT_FILES as ARTIFACT_FILES
from helpers import broken_reward as broken_reward  # reward plug-ins, re-exported: the stage
from helpers import first_token_reward as first_token_reward  # loads test_grpo:<name>
from memgen_cli.artifacts import artifact_digest
from memgen_cli.cli import app
from memgen_cli.config import GenerationConfig, GRPOConfig, load_recipe
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.stages import grpo_weaver as stage
from memgen_cli.training import grpo as grpo_loop
from memgen_cli.training.rollouts import Rollouts, policy_inputs, policy_logprobs, rollout
from stage_runs import command_run, train_on_two_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "grpo-weaver.yaml"
MESSAGES = chats("Hi there, what is 2+2?", "Yo, say a word.", "Count: 1, 2")

# One thread for the slow tests too (see conftest.one_thread for the measurement).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tiny_base, tmp_path, *sets, **flags) -> GRPOConfig:
    """The tiny recipe on 8 problems (helpers.tiny_config)."""
    return tiny_config(stage, TINY, tiny_base, tmp_path, sets, 8, **flags)


# A reward plug-in of this module's own, beside those imported from helpers.
def even_token_reward(prompts, completions, completion_ids, **columns):
    """The share of even token ids: it differs between a group's sampled completions."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


# ------------------------------------------------------------------------------ rollouts
def eos_sometimes(mg: MemGenModel) -> MemGenModel:
    """Make EOS as likely as a token the model often picks, so some rows end early."""
    out = rollout(mg, MESSAGES[:1], GenerationConfig(max_new_tokens=6, memory="weaver"), 1)
    with torch.no_grad():
        head = mg.reasoner.get_output_embeddings().weight
        head[mg.tokenizer.eos_token_id] = head[out.completion_ids[0][4]] * 1.05
    return mg


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.5, 3)], ids=["greedy", "sampled"])
def test_training_forward_logprobs_equal_sampling_logprobs(temperature, seed):
    mg = eos_sometimes(make_memgen("llama"))
    cfg = GenerationConfig(max_new_tokens=24, temperature=temperature, seed=seed, memory="weaver")
    r = rollout(mg, MESSAGES, cfg, 2)
    # The cases that matter: a row ending early, rows weaving at different steps.
    assert any(r.finished) and not all(r.finished)
    assert len({tuple(p) for p in r.inference_points}) > 2 and any(r.inference_points)
    assert r.prompt_insertion
    b = policy_inputs(r, mg.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "completion_index", "completion_mask")
    logps, entropy = policy_logprobs(
        mg, *(b[k] for k in keys), b["prompt_points"], b["inference_points"], temperature
    )
    real = b["completion_mask"].bool()
    assert int(real.sum()) == sum(len(c) for c in r.completion_ids)
    gap = (logps.detach() - b["sampling_logps"]).abs()[real]
    assert float(gap.max()) < 1e-4, float(gap.max())
    assert (entropy[real] > 0).all() and (logps[~real] == 0).all()


def test_logprobs_follow_the_trace_when_a_trained_trigger_decides():
    mg = make_memgen("llama")
    with torch.no_grad():
        mg.trigger.trained.fill_(True)  # a random head: it skips some clause boundaries
    cfg = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3, memory="full")
    r = rollout(mg, MESSAGES, cfg, 2)
    always = rollout(mg, MESSAGES, GenerationConfig(**{**cfg.__dict__, "memory": "weaver"}), 2)
    assert r.inference_points != always.inference_points and any(r.inference_points)
    b = policy_inputs(r, mg.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "completion_index", "completion_mask")
    with torch.no_grad():
        logps, _ = policy_logprobs(
            mg, *(b[k] for k in keys), b["prompt_points"], b["inference_points"], 1.0
        )
    real = b["completion_mask"].bool()
    assert float((logps - b["sampling_logps"]).abs()[real].max()) < 1e-4


def test_logprob_gradients_reach_only_the_weaver():
    mg = make_memgen("llama")
    mg.set_trainable(weaver=True, trigger=False)
    r = rollout(mg, MESSAGES, GenerationConfig(max_new_tokens=12, temperature=1.0), 2)
    b = policy_inputs(r, mg.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "completion_index", "completion_mask")
    logps, _ = policy_logprobs(mg, *(b[k] for k in keys), b["prompt_points"], b["inference_points"])
    logps.sum().backward()
    weaver = {id(p) for p in mg.weaver_parameters().values()}
    with_grad = {id(p) for p in mg.parameters() if p.grad is not None}
    assert with_grad <= weaver  # nothing of the reasoner or the trigger
    assert mg.weaver.queries["prompt"].grad.abs().sum() > 0
    assert any(p.grad is not None for n, p in mg.weaver_parameters().items() if "lora_A" in n)


def test_shared_prompt_rollouts_equal_unshared_ones():
    mg = make_memgen("llama")
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=5, memory="weaver")
    shared = rollout(mg, MESSAGES, cfg, 3)
    repeated = [m for m in MESSAGES for _ in range(3)]
    enc = encode_prompts(mg.tokenizer, repeated, "cpu")
    plain = generate(mg, enc["input_ids"], enc["attention_mask"], cfg, keep_logprobs=True)
    assert shared.texts_ids == plain.tokens
    points = [
        [i.token_index for i in plain.trace.for_row(r) if i.kind == "inference"] for r in range(9)
    ]
    assert shared.inference_points == points and any(points)
    for a, b in zip(shared.logprobs, plain.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    # The G rows of a prompt share it, and sampling still gives them different answers.
    assert shared.prompt_ids[0] == shared.prompt_ids[2] != shared.prompt_ids[3]
    assert len({tuple(c) for c in shared.completion_ids[:3]}) > 1


def test_policy_inputs_layout():
    r = Rollouts(
        group_size=2,
        prompt_ids=[[5, 6, 7], [8, 9]],
        completion_ids=[[10, 11], [12]],
        logprobs=[[-0.5, -1.5], [-2.0]],
        finished=[False, True],
        prompt_insertion=True,
        inference_points=[[1], []],
    )
    b = policy_inputs(r, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 10, 11], [8, 9, 12, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b["completion_index"].tolist() == [[3, 4], [2, 2]]
    assert b["completion_mask"].tolist() == [[1, 1], [1, 0]]
    assert b["sampling_logps"].tolist() == [[-0.5, -1.5], [-2.0, 0.0]]
    # Latents after the prompt's last token, and after 1 completion token of row 0 (column 3).
    assert b["prompt_points"] == [2, 1] and b["inference_points"] == [[3], []]
    assert r.texts_ids == [[10, 11], []]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("iterations", [1, 2])
def test_the_loss_skips_zero_advantage_rows_with_the_same_loss_and_gradient(loss_type, iterations):
    """With beta 0 only rows with a non-zero advantage run the training forward; loss and
    gradients equal those of every row run (skipped rows keep their place in the normalisers)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from memgen_cli.training import grpo
    from memgen_cli.training.grpo import GRPOSettings, GRPOTrainer, PolicyObjective

    mg = make_memgen("llama")
    mg.set_trainable(weaver=True, trigger=False)
    r = rollout(mg, MESSAGES, GenerationConfig(max_new_tokens=10, temperature=1.0, seed=5), 2)
    b = policy_inputs(r, mg.tokenizer.pad_token_id)
    b["advantages"] = torch.tensor([0.7, -0.7, 0.0, 0.0, 0.0, 0.0])  # only prompt 0 informs
    b["loss_mask"] = b["completion_mask"].clone()
    b["iteration"] = 0
    if iterations > 1:  # old log-probs from an earlier pass, not equal to the current ones
        b["old_logps"] = b["sampling_logps"] - 0.05 * torch.arange(6.0)[:, None]
    settings = GRPOSettings(
        num_generations=2,
        temperature=1.0,
        top_p=1.0,
        max_completion_length=10,
        memory="weaver",
        loss_type=loss_type,
        scale_rewards="group",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.2,
        num_iterations=iterations,
        mask_truncated_completions=False,
        disable_dropout=True,
        seed=0,
        log_completions_steps=0,
        prompt_suffix="",
        system=None,
    )
    objective = PolicyObjective(mg)
    calls = []
    objective.register_forward_hook(
        lambda m, args, kw, out: calls.append(len(kw["input_ids"])), with_kwargs=True
    )

    def loss_and_grads(skip: bool):
        fake = SimpleNamespace(
            s=settings, _metrics=defaultdict(list), current_gradient_accumulation_steps=1
        )
        fake.policy_rows = lambda inputs, rows: GRPOTrainer.policy_rows(fake, inputs, rows)
        mg.zero_grad()
        with pytest.MonkeyPatch.context() as patch:
            if not skip:  # the reference: every row through the training forward
                patch.setattr(grpo, "scored_rows", lambda adv, beta: torch.arange(len(adv)))
            loss = GRPOTrainer.compute_loss(fake, objective, dict(b), num_items_in_batch=40.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in mg.weaver_parameters().items() if p.grad is not None}
        return loss.detach(), grads, fake._metrics

    loss_all, grads_all, _ = loss_and_grads(skip=False)
    loss_skip, grads_skip, metrics = loss_and_grads(skip=True)
    assert calls == [6, 2]  # the second pass ran the two informative rows only
    torch.testing.assert_close(loss_skip, loss_all, atol=1e-6, rtol=1e-5)
    assert grads_all.keys() == grads_skip.keys() and grads_all
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_skip[name], grad, atol=1e-7, rtol=1e-4)
    assert metrics["logp_diff/max"][0] < 1e-4


@pytest.mark.parametrize(
    "dtype, dropout_off, recomputed",
    [(torch.float32, True, False), (torch.float32, False, True), (torch.bfloat16, True, True)],
)
def test_old_logprobs_are_the_sampling_ones_only_where_they_are_exact(
    dtype, dropout_off, recomputed
):
    """num_iterations > 1 needs the sampling policy's log-probs: in fp32 without dropout the
    rollout's own (equal to the training forward's within 1e-4, the test above), otherwise the
    training forward recomputes them."""
    from types import SimpleNamespace

    from memgen_cli.training.grpo import GRPOTrainer

    mg = make_memgen("llama")
    r = rollout(mg, MESSAGES, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=5), 2)
    b = policy_inputs(r, mg.tokenizer.pad_token_id)
    scored = []
    fake = SimpleNamespace(
        policy=SimpleNamespace(dtype=dtype),
        s=SimpleNamespace(disable_dropout=dropout_off),
        _score=lambda batch: scored.append(batch) or torch.zeros_like(batch["sampling_logps"]),
    )
    old = GRPOTrainer._old_logps(fake, b)
    assert bool(scored) == recomputed
    if not recomputed:
        assert old.dtype == torch.float32 and torch.equal(old, b["sampling_logps"])
        keys = ("input_ids", "attention_mask", "completion_index", "completion_mask")
        logps, _ = policy_logprobs(
            mg, *(b[k] for k in keys), b["prompt_points"], b["inference_points"], 1.0
        )
        real = b["completion_mask"].bool()
        assert float((logps - old).abs()[real].max()) < 1e-4


# ------------------------------------------------------------------------------ training
def first_token_probs(mg: MemGenModel, cfg: GRPOConfig) -> torch.Tensor:
    """The policy's exact distribution of the first completion token on the training prompts."""
    _, train, _, _ = stage.sft_run.load_examples(cfg)
    msgs = [[{"role": "user", "content": e.question}] for e in train]
    enc = encode_prompts(mg.tokenizer, msgs, "cpu")
    gen = GenerationConfig(max_new_tokens=1, memory="weaver")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], gen, keep_logits=True)
    return out.step_logits[0].softmax(-1)  # (prompts, V), temperature 1 as in training


def test_grpo_steps_raise_a_learnable_reward_and_change_only_the_weaver(tiny_base, tmp_path):
    sets = [
        "reward.task_weight=0",
        "training.num_generations=16",
        "training.batch_size=32",
        "training.max_completion_length=2",
        "training.max_steps=10",
        "training.learning_rate=0.01",
        "training.seed=1",
        "training.log_completions_steps=0",
    ]
    cfg = tiny_cfg(tiny_base, tmp_path, *sets, rewards=["test_grpo:first_token_reward"])
    set_seed(cfg.training.seed)  # the stage's seed, then the same construction: initial weights
    fresh = load_base(str(tiny_base), "cpu")
    initial = MemGenModel(fresh.model, fresh.tokenizer, cfg.memory)
    before = first_token_probs(initial, cfg)
    # Reward: the first token is one of the 12 the untrained policy likes best (about 30 %).
    TARGET["tokens"] = set(before.mean(0).topk(12).indices.tolist())
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])

    trained = capture.model.memgen.eval()
    index = torch.tensor(sorted(TARGET["tokens"]))
    expected = [
        float(p[:, index].sum(-1).mean()) for p in (before, first_token_probs(trained, cfg))
    ]
    assert expected[1] > expected[0] + 0.1, expected  # the mean reward, exactly
    logged = [r["reward"] for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert len(logged) == 10 and sum(logged[-3:]) > sum(logged[:3]), logged  # as sampled

    changed = {
        n
        for n, p in trained.weaver_parameters().items()
        if not torch.equal(p.detach(), initial.weaver_parameters()[n].detach())
    }
    assert "weaver.queries.prompt" in changed and any("lora_B" in n for n in changed)
    plain = load_base(str(tiny_base), "cpu").model.state_dict()
    reasoner = plain_names(trained.peft.state_dict())
    assert set(reasoner) == set(plain)
    for name, value in plain.items():
        assert torch.equal(reasoner[name], value), f"reasoner tensor {name} changed"
    for name, value in initial.trigger.state_dict().items():
        assert torch.equal(trained.trigger.state_dict()[name], value)
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["parent"] is None and manifest["training"]["rewards"] == ["first_token_reward"]


# ------------------------------------------------------------------- artifact and logs
TRL_METRICS = {
    "loss",
    "grad_norm",
    "learning_rate",
    "reward",
    "reward_std",
    "rewards/accuracy/mean",
    "rewards/accuracy/std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "insertions/mean",
    "logp_diff/mean",
    "logp_diff/max",
}


def cli(*args):
    return CliRunner().invoke(app, ["grpo-weaver", *map(str, args)])


def test_from_an_sft_artifact_writes_an_artifact_with_its_parent_metrics_and_completions(
    tiny_weaver, tmp_path
):
    base_dir, parent = tiny_weaver  # a weaver artifact (K = 3 / 2, its own memory)
    data = write_problems(tmp_path / "train.jsonl", 10)
    out = tmp_path / "out"
    result = cli(
        "--recipe",
        TINY,
        "--base",
        base_dir,
        "--data",
        data,
        "--init",
        parent,
        "--output",
        out,
        "--set",
        "training.beta=0.05",
        "--set",
        "data.heldout=2",
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "step 3/3 reward" in text and " ins " in text  # a progress line per step in a log
    assert files(out) == ARTIFACT_FILES | {
        "completions/step_00001.jsonl",
        "completions/step_00002.jsonl",
    }
    assert not stage.checkpoint_dir(stage.resolve_config(TINY, output=out)).exists()
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["parent"] == {"name": str(parent), "sha256": artifact_digest(parent)}
    before = json.loads((parent / "memgen.json").read_text())
    assert manifest["memory"] == before["memory"]  # the artifact's settings, not the recipe's
    s = manifest["training"]
    assert (s["stage"], s["steps"], s["prompts"], s["num_generations"]) == ("grpo-weaver", 3, 8, 4)
    recipe = load_recipe(GRPOConfig, out / "recipe.yaml")
    assert recipe.init == str(parent) and recipe.memory.prompt_latents == 3
    held = s["heldout_accuracy"]
    assert (
        set(held) == {"weaver_initial", "weaver_final", "memory_off"} and s["heldout_samples"] == 2
    )  # their values: test_heldout_accuracy_is_what_memgen_eval_measures

    logs = [r for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in logs] == [1, 2, 3]
    for r in logs:
        assert TRL_METRICS | {"kl"} <= set(r), TRL_METRICS - set(r)
        assert r["logp_diff/max"] < 1e-4  # rollout and loss see the same policy
        assert r["completions/max_length"] <= 16 and 0 <= r["frac_reward_zero_std"] <= 1
    # beta > 0: the reference is the starting weaver, so the first step's KL is 0 exactly.
    assert logs[0]["kl"] == 0.0
    shown = rows(out / "completions" / "step_00002.jsonl")
    assert len(shown) == 8  # 2 prompts x G=4
    assert set(shown[0]) == {
        "id",
        "prompt",
        "completion",
        "rewards",
        "reward",
        "advantage",
        "insertions",
        "finished",
    }
    marked = [r for r in shown if r["insertions"]]
    assert marked and all(r["completion"].count("⟨mem 2⟩") == r["insertions"] for r in marked)
    # Advantages are centred within each group of G = 4.
    for g in range(2):
        assert abs(sum(r["advantage"] for r in shown[4 * g : 4 * g + 4])) < 1e-3


def test_heldout_accuracy_is_what_memgen_eval_measures(tiny_weaver, tmp_path):
    """The summary's held-out accuracies against an independent measurement: ``memgen eval`` of
    the parent (weaver_initial), of the plain reasoner (memory_off) and of the written artifact
    (weaver_final) on the same two held-out problems, greedy, at the same length and prompt. The
    gold answers are what the plain reasoner and the parent weaver answered before training (an
    exact-match task), so the figures are not all 0 as a tiny model's would be."""
    base_dir, parent = tiny_weaver
    problems = [{"question": f"What is {a} + {a + 1}?", "answer": "never-said"} for a in range(10)]
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"  # held: the last 2 rows

    def write(path: Path, items: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in items))

    def measured(artifact: Path, out: str) -> dict[str, list[dict]]:
        args = ["eval", "--artifact", artifact, "--data", "jsonl", "--memory", "off,weaver"]
        args += ["--task-option", f"path={held}", "--task-option", "grader=exact"]
        args += ["--max-new-tokens", 16, "--prompt-suffix", "", "--output", tmp_path / out]
        result = CliRunner().invoke(app, [*map(str, args), "--json"])
        assert result.exit_code == 0, result.output
        preds = rows(tmp_path / out / "predictions.jsonl")
        return {
            m: sorted((p for p in preds if p["mode"] == m), key=lambda p: p["index"])
            for m in ("off", "weaver")
        }

    write(held, problems[8:])
    before = measured(parent, "before")
    problems[8]["answer"] = before["off"][0]["extracted"]  # the plain reasoner's answer to row 8
    problems[9]["answer"] = before["weaver"][1]["extracted"]  # the parent weaver's to row 9
    assert problems[8]["answer"] and problems[9]["answer"]
    write(data, problems)
    write(held, problems[8:])
    before = measured(parent, "before-2")
    out = tmp_path / "out"
    task = ["--data", "jsonl", "--task-option", f"path={data}", "--task-option", "grader=exact"]
    sets = ["--set", "data.heldout=2", "--set", "training.max_steps=1"]
    result = cli(
        "--recipe", TINY, "--base", base_dir, *task, "--init", parent, "--output", out, *sets
    )
    assert result.exit_code == 0, result.output
    after = measured(out, "after")

    def accuracy(preds: list[dict]) -> float:
        return sum(p["correct"] for p in preds) / len(preds)

    expected = {
        "weaver_initial": accuracy(before["weaver"]),
        "weaver_final": accuracy(after["weaver"]),
        "memory_off": accuracy(after["off"]),
    }
    assert expected["weaver_initial"] >= 0.5 and expected["memory_off"] >= 0.5, expected
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["training"]["heldout_accuracy"] == pytest.approx(expected)


def test_num_iterations_reuses_each_rollout_batch(tiny_base, tmp_path):
    cfg = tiny_cfg(
        tiny_base, tmp_path, "training.num_iterations=2", "training.max_steps=4", "training.seed=3"
    )
    logs = [r for r in rows(stage.run(cfg) / "metrics.jsonl") if "reward" in r]
    keys = ("reward", "completions/mean_length", "insertions/mean", "frac_reward_zero_std")
    for a, b in [(0, 1), (2, 3)]:  # steps 1-2 train on one rollout batch, steps 3-4 on the next
        assert [logs[a][k] for k in keys] == [logs[b][k] for k in keys]
        # logp_diff is measured on the first pass only (the weights have moved since sampling).
        assert "logp_diff/mean" in logs[a] and "logp_diff/mean" not in logs[b]
    assert logs[1]["grad_norm"] != logs[0]["grad_norm"]  # a second, different step on them


def test_mask_truncated_completions_leaves_cut_answers_out(tiny_base, tmp_path):
    # With this seed the random tiny model never stops within 4 tokens (EOS is drawn about once
    # in 100 tokens, so most seeds see one): every completion is cut, none trains.
    sets = [
        "training.mask_truncated_completions=true",
        "training.max_completion_length=4",
        "training.seed=11",
    ]
    cfg = tiny_cfg(tiny_base, tmp_path, *sets)
    console = Console(file=io.StringIO(), width=400)
    out = stage.run(cfg, console=console)
    logs = [r for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert all(r["completions/clipped_ratio"] == 1.0 and r["grad_norm"] == 0.0 for r in logs)
    # Cut answers three logs running: the failure users of the official code hit, named.
    assert "completions/clipped_ratio has stayed >= 0.9 for 3 logs" in console.file.getvalue()
    assert len(logs) == 3 and files(out) >= ARTIFACT_FILES
    # Without the mask the same rollouts (same seeds, same weights so far) do give a gradient.
    unmasked = tiny_cfg(
        tiny_base, tmp_path / "b", "training.max_completion_length=4", "training.seed=11"
    )
    plain = [r for r in rows(stage.run(unmasked) / "metrics.jsonl") if "reward" in r]
    assert [r["reward"] for r in plain] == [r["reward"] for r in logs]
    assert any(r["grad_norm"] > 0 for r in plain)


def test_task_options_reach_the_task_and_the_artifact(tiny_base, tmp_path):
    out = tmp_path / "out"
    option = "config={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}"
    result = cli(
        *("--recipe", TINY, "--base", tiny_base, "--data", "gym:basic_arithmetic"),
        *("--task-option", option, "--output", out, "--set", "training.max_steps=1"),
    )
    assert result.exit_code == 0, result.output
    s = json.loads((out / "memgen.json").read_text())["training"]
    assert s["task"] == "gym:basic_arithmetic"
    assert s["task_options"] == {
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    }
    (first,) = rows(out / "completions" / "step_00001.jsonl")[:1]
    assert len(re.findall(r"\d+", first["prompt"])) == 2  # two terms of one digit each
    assert all(len(n) == 1 for n in re.findall(r"\d+", first["prompt"]))


def test_resume_after_interruption_gives_the_same_weights(tiny_base, tmp_path):
    sets = ["training.max_steps=4", "memory.lora_dropout=0.1", "training.disable_dropout=false"]
    straight = stage.run(tiny_cfg(tiny_base, tmp_path / "a", *sets))

    cfg = tiny_cfg(tiny_base, tmp_path / "b", *sets)
    with pytest.raises(stage.TrainingInterrupted) as stop:
        stage.run(cfg, callbacks=[Capture(interrupt_at=1)])
    assert stop.value.checkpoint.name == "checkpoint-2"  # Ctrl-C at step 1: stops after step 2
    assert not Path(cfg.output).exists()
    with pytest.raises(Exception, match="--resume auto"):
        stage.run(cfg)
    resumed = stage.run(cfg, resume="auto")

    for name in ("weaver.safetensors", "weaver/adapter_model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    logs = [r for r in rows(resumed / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    same = [r for r in rows(straight / "metrics.jsonl") if "reward" in r]
    for key in ("reward", "completions/mean_length", "insertions/mean", "grad_norm"):
        assert [r[key] for r in logs] == [r[key] for r in same], key  # rollouts regenerated alike


# ------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--set", "training.batch_size=6"],
            "training.batch_size (6) must be a multiple of training.num_generations (4)",
        ),
        (["--set", "training.num_generations=1"], "num_generations must be >= 2"),
        (["--set", "training.loss_type=ppo"], "loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
        (
            ["--set", "training.scale_rewards=row"],
            "scale_rewards must be one of group, batch, none",
        ),
        (["--set", "training.temperature=0"], "temperature must be > 0"),
        (["--reward", "no_such_module_xyz:f"], 'cannot import module "no_such_module_xyz"'),
        (["--reward", "test_grpo:nothing_here"], 'has no function "nothing_here"'),
        (
            [
                "--reward",
                "test_grpo:first_token_reward",
                "--reward-weight",
                "1",
                "--reward-weight",
                "2",
            ],
            "reward.weights has 2 values for 1 reward functions",
        ),
        (["--init", "no/such/artifact"], "does not exist"),
        (["--set", "training.memory=full"], "needs --init with a trained trigger"),
        (["--set", "training.lerning_rate=1"], 'Did you mean "learning_rate"'),
        (
            ["--reward", "test_grpo:broken_reward"],
            "reward function broken_reward raised ValueError",
        ),
    ],
    ids=[
        "batch-not-divisible",
        "one-generation",
        "loss-type",
        "scale-rewards",
        "greedy",
        "reward-module",
        "reward-function",
        "reward-weights",
        "init-missing",
        "full-no-trigger",
        "unknown-key",
        "reward-raises",
    ],
)
def test_bad_input_exits_2_with_its_message_and_writes_nothing(tiny_base, tmp_path, extra, message):
    data = write_problems(tmp_path / "train.jsonl", 8)
    out = tmp_path / "out"
    result = cli("--recipe", TINY, "--base", tiny_base, "--data", data, "--output", out, *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # nothing half-written


@pytest.mark.parametrize("output", BROKEN_REWARD_OUTPUTS.values(), ids=BROKEN_REWARD_OUTPUTS)
def test_a_reward_raising_at_the_first_rollout_leaves_the_folders_as_they_were(
    tiny_weaver, tmp_path, monkeypatch, output
):
    """By the first rollout the run has made its checkpoint folder and the folders above
    --output; the failure removes them, and nothing that was there before."""
    monkeypatch.chdir(tmp_path)
    assert_broken_reward_leaves_folders(
        cli, TINY, tiny_weaver, tmp_path, output, "test_grpo:broken_reward"
    )


# -------------------------------------------------------------------------- processes
# One prompt per micro-batch: the two processes' one each, or one process's two micro-batches.
ONE_PROMPT = ["reward.task_weight=0", "training.batch_size=4", "training.max_steps=2"]
ONE_PROMPT += ["training.log_completions_steps=0", "training.learning_rate=0.01"]


def prompt_seeded(real):
    """``rollout`` seeded by its prompts instead of by (step, rank, micro-batch): a prompt then
    gets the same G completions whichever process samples it."""

    def seeded(model, messages, cfg, group_size):
        seed = zlib.crc32(json.dumps(messages).encode())
        return real(model, messages, dataclasses.replace(cfg, seed=seed), group_size)

    return seeded


def _grpo_worker(rank: int, port: int, cfg: GRPOConfig) -> None:
    """One of two processes as torchrun starts them (the environment accelerate reads)."""
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    AcceleratorState._reset_state(reset_partial_state=True)  # fork copied the parent's state
    grpo_loop.rollout = prompt_seeded(grpo_loop.rollout)
    stage.run(cfg, console=Console(file=io.StringIO()))


def test_two_processes_train_as_one_process_with_both_micro_batches(
    tiny_base, tmp_path, monkeypatch
):
    """Each step's two prompts on two gloo processes, one each, or on one process as two
    micro-batches: the same weaver after two steps, and the same logged rewards and loss (the
    all-reduced token counts, the loss's world-size factor and DDP's gradient mean agree)."""
    rewards = ["test_grpo:even_token_reward"]
    one = tiny_cfg(
        tiny_base, tmp_path / "one", *ONE_PROMPT, "training.grad_accumulation=2", rewards=rewards
    )
    two = tiny_cfg(tiny_base, tmp_path / "two", *ONE_PROMPT, rewards=rewards)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the loaded modules instead of importing the CLI again
    mp.start_processes(_grpo_worker, args=(port, two), nprocs=2, start_method="fork")
    monkeypatch.setattr(grpo_loop, "rollout", prompt_seeded(grpo_loop.rollout))
    stage.run(one, console=Console(file=io.StringIO()))

    a, b = Path(one.output), Path(two.output)
    assert json.loads((b / "memgen.json").read_text())["training"]["world_size"] == 2
    for name in ("weaver.safetensors", "weaver/adapter_model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(y[key], x[key], atol=1e-5, rtol=1e-4, msg=key)
    logs = [[r for r in rows(out / "metrics.jsonl") if "reward" in r] for out in (a, b)]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] == [1, 2]
    assert all(r["grad_norm"] > 0 for r in logs[0])  # the weaver did learn
    for mine, theirs in zip(logs[0], logs[1], strict=True):
        for key in ("reward", "reward_std", "loss", "grad_norm", "completions/mean_length"):
            assert theirs[key] == pytest.approx(mine[key], abs=1e-5), key


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tiny_recipe_end_to_end_on_the_embedded_model(tmp_path):
    light = ["training.max_steps=2", "training.batch_size=4", "training.num_generations=2"]
    light += ["training.max_completion_length=12"]  # about 40 s of CPU on a quiet 2-core machine
    out = tmp_path / "out"
    written = ARTIFACT_FILES | {"completions/step_00001.jsonl", "completions/step_00002.jsonl"}
    sets = [f"--set={s}" for s in light]
    manifest = command_run(cli, out, written, "--recipe", TINY, *sets)
    assert manifest["reasoner"]["name"] == "smollm2-135m"
    assert manifest["training"]["steps"] == 2 and manifest["training"]["task"] == "gsm_symbolic"
    for r in (r for r in rows(out / "metrics.jsonl") if "reward" in r):
        assert r["logp_diff/max"] < 1e-3, r  # fp32 on a 30-layer model: float error only


@pytest.mark.slow
def test_two_process_torchrun_writes_one_artifact(tiny_base, tmp_path):
    """Launched by torchrun; that two processes train as one process does, on the same
    completions: test_two_processes_train_as_one_process_with_both_micro_batches."""
    data = write_problems(tmp_path / "train.jsonl", 8)
    out = train_on_two_processes("grpo-weaver", TINY, tiny_base, data, tmp_path)
    assert files(out) == ARTIFACT_FILES | {
        "completions/step_00001.jsonl",
        "completions/step_00002.jsonl",
    }
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    s = json.loads((out / "memgen.json").read_text())["training"]
    assert s["world_size"] == 2
    logs = [r for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert {r["world_size"] for r in logs} == {2}
    # Each process answered its own 2 prompts: the completions log holds both (2 x 2 x G=4).
    assert len(rows(out / "completions" / "step_00001.jsonl")) == 16
