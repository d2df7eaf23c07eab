"""`memgen baseline grpo`: LoRA-GRPO of the reasoner with TRL's GRPOTrainer.

Fast tests train a 2-layer Llama saved to a temporary directory (``--base DIR``) on a small
GSM8K-format JSONL with the tiny recipe; nothing here needs the embedded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from helpers import BASELINE_ARTIFACT_FILES as ARTIFACT_FILES
from helpers import (
    BROKEN_REWARD_OUTPUTS,
    TARGET,
    Capture,
    assert_broken_reward_leaves_folders,
    files,
    invoke,
    plain_names,
    rows,
    tiny_config,
    write_problems,
)
from helpers import first_token_reward as first_token_reward  # re-exported: a reward plug-in
from memgen_cli.artifacts import artifact_digest, load_baseline
from memgen_cli.config import BaselineGRPOConfig
from memgen_cli.data import to_messages
from memgen_cli.errors import MemgenError
from memgen_cli.generation import encode_prompts
from memgen_cli.models.base import load_base
from memgen_cli.stages import baseline as sft_stage
from memgen_cli.stages import baseline_grpo as stage
from memgen_cli.training.sft_run import load_examples
from stage_runs import finished_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "baseline-grpo.yaml"
TINY_SFT = ROOT / "recipes" / "tiny" / "baseline-sft.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tiny_base, tmp_path, *sets, **flags) -> BaselineGRPOConfig:
    """The tiny recipe on 8 problems (helpers.tiny_config)."""
    return tiny_config(stage, TINY, tiny_base, tmp_path, sets, 8, **flags)


def cli(*args):
    """``memgen baseline grpo ARGS``."""
    return invoke("baseline", "grpo", *args)


def common(tiny_base, tmp_path) -> list:
    """The tiny recipe's arguments, on 8 problems written to ``tmp_path``, output ``out`` in it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_problems(tmp_path / "train.jsonl", 8)
    return ["--recipe", TINY, "--base", tiny_base, "--data", data, "--output", tmp_path / "out"]


@torch.no_grad()
def first_token_probs(model, tok, cfg) -> torch.Tensor:
    """The policy's first-token distribution on each training prompt (one prompt at a time:
    no padding, so positions are those of generation)."""
    _, train, _, _ = load_examples(cfg)
    msgs = [to_messages(e, cfg.data.prompt_suffix, cfg.data.system) for e in train]
    model.eval()
    return torch.cat(
        [model(**encode_prompts(tok, [m], "cpu")).logits[:, -1].softmax(-1) for m in msgs]
    )


# --------------------------------------------------------------------------- training
def test_grpo_steps_raise_a_learnable_reward_and_change_only_lora_tensors(tiny_base, tmp_path):
    sets = [
        "reward.task_weight=0",
        "training.num_generations=16",
        "training.batch_size=32",
        "training.max_completion_length=2",
        "training.max_steps=8",
        "training.learning_rate=0.05",
        "training.seed=1",
        "lora.targets=[q_proj,k_proj,v_proj,o_proj]",
    ]
    cfg = tiny_cfg(tiny_base, tmp_path, *sets, rewards=["test_baseline_grpo:first_token_reward"])
    plain = load_base(str(tiny_base), "cpu")
    before = first_token_probs(plain.model, plain.tokenizer, cfg)
    # Reward: the first token is one of the 12 the untrained policy likes best.
    TARGET["tokens"] = set(before.mean(0).topk(12).indices.tolist())
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])

    trained = capture.model
    index = torch.tensor(sorted(TARGET["tokens"]))
    after = first_token_probs(trained, plain.tokenizer, cfg)
    expected = [float(p[:, index].sum(-1).mean()) for p in (before, after)]
    assert expected[1] > expected[0] + 0.2, expected  # the mean reward, exactly
    logged = [r["reward"] for r in rows(out / "metrics.jsonl") if "reward" in r]
    assert len(logged) == 8 and sum(logged[-3:]) > sum(logged[:3]), logged  # as sampled
    assert "rewards/first_token_reward/mean" in rows(out / "metrics.jsonl")[0]

    state = {k: v.detach() for k, v in trained.state_dict().items()}
    lora = {k for k in state if "lora_" in k}
    assert lora and all(not torch.equal(state[k], capture.initial[k]) for k in lora)
    reasoner = plain_names(state)
    assert set(reasoner) == set(plain.model.state_dict())
    for name, value in plain.model.state_dict().items():
        assert torch.equal(reasoner[name], value), f"reasoner tensor {name} changed"
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    s = json.loads((out / "memgen.json").read_text())["training"]
    assert s["rewards"] == ["first_token_reward"] and s["reward_weights"] == [1.0]
    assert s["first_reward"] == logged[0] and s["final_reward"] == logged[-1]


def test_artifact_file_set_manifest_plain_peft_reload_and_eval(tiny_base, tmp_path):
    cfg = tiny_cfg(tiny_base, tmp_path, "data.heldout=2")
    out, manifest, capture = finished_run(stage, cfg, ARTIFACT_FILES)
    assert manifest["kind"] == "baseline" and manifest["parent"] is None
    base = load_base(str(tiny_base), "cpu")
    assert manifest["reasoner"]["fingerprint"] == base.fingerprint
    budget, lora = manifest["budget"], manifest["lora"]
    unit = sft_stage.lora_params_per_rank(base.model, lora["targets"])
    weaver = sft_stage.weaver_trainable_params(base.model, cfg.memory)
    assert budget == {"trainable_params": lora["r"] * unit, "weaver_trainable_params": weaver}
    assert abs(budget["trainable_params"] - weaver) <= unit / 2  # the closest rank
    s = manifest["training"]
    assert (s["stage"], s["method"], s["task"], s["steps"]) == (
        "baseline-grpo",
        "lora-grpo",
        "gsm8k",
        3,
    )
    assert (s["samples"], s["heldout_samples"], s["num_generations"]) == (6, 2, 4)
    assert set(s["heldout_accuracy"]) == {"initial", "final"} and s["rewards"] == ["accuracy"]
    assert s["wall_s"] >= 0 and s["first_reward"] is not None and s["init"] is None
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)  # no base weights leak in

    ids = torch.tensor([[5, 40, 41, 42, 43, 7, 9]])
    with torch.no_grad():
        a = capture.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_base(str(tiny_base), "cpu").model, str(out))
        b = reloaded.eval()(input_ids=ids).logits
        c, _, _ = load_baseline(out, device="cpu")
        plain = base.model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(a, c(input_ids=ids).logits)
    assert not torch.allclose(a, plain)  # the adapter really changes the reasoner

    result = invoke(
        *("eval", "--artifact", out, "--data", tmp_path / "train.jsonl", "--limit", 2),
        *("--max-new-tokens", 4, "--output", tmp_path / "eval", "--json"),
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [(r["mode"], r["n"]) for r in metrics["results"]] == [("off", 2)]


def test_init_from_a_baseline_sft_artifact_and_refusals(
    tiny_base, tiny_weaver, tiny_qwen_base, tmp_path
):
    one_step = ["training.max_steps=1", "lora.dropout=0.0"]
    sft = sft_stage.run(tiny_config(sft_stage, TINY_SFT, tiny_base, tmp_path / "sft", one_step, 8))
    start = load_file(sft / "adapter_model.safetensors")
    # beta > 0: TRL keeps a frozen copy of the init adapter as reference; it stays out.
    TARGET["tokens"] = set(range(0, 300, 2))  # about half the first tokens: groups differ
    sets = ["training.beta=0.1", "reward.task_weight=0", "training.max_completion_length=2"]
    rewards = ["test_baseline_grpo:first_token_reward"]
    cfg = tiny_cfg(tiny_base, tmp_path / "grpo", *sets, init=sft, rewards=rewards)
    capture = Capture()
    out = stage.run(cfg, callbacks=[capture])
    initial = {k.replace(".default", ""): v for k, v in capture.initial.items() if "lora_" in k}
    assert {k: v for k, v in initial.items() if ".ref." not in k}.keys() == start.keys()
    for name, value in start.items():
        assert torch.equal(initial[name], value), name  # training starts from init's adapter
    assert files(out) == ARTIFACT_FILES
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    manifest = json.loads((out / "memgen.json").read_text())
    sft_manifest = json.loads((sft / "memgen.json").read_text())
    assert manifest["parent"] == {"name": str(sft), "sha256": artifact_digest(sft)}
    assert manifest["lora"] == sft_manifest["lora"] and manifest["training"]["init"] == str(sft)
    assert manifest["budget"] == sft_manifest["budget"]
    assert manifest["training"]["steps"] == 3

    other = tiny_qwen_base
    with pytest.raises(MemgenError, match="was trained on base .* pass --base"):
        stage.run(tiny_cfg(other, tmp_path / "mismatch", init=sft))
    assert not (tmp_path / "mismatch" / "out").exists()

    _, weaver = tiny_weaver
    result = cli(*common(tiny_base, tmp_path / "w"), "--init", weaver)
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "is a weaver artifact" in text and "`memgen baseline sft`" in text, text


@pytest.mark.parametrize("output", BROKEN_REWARD_OUTPUTS.values(), ids=BROKEN_REWARD_OUTPUTS)
def test_a_reward_raising_at_the_first_rollout_leaves_the_folders_as_they_were(
    tiny_weaver, tmp_path, monkeypatch, output
):
    """By the first rollout the run has made its checkpoint folder and the folders above
    --output; the failure removes them, and nothing that was there before."""
    monkeypatch.chdir(tmp_path)
    assert_broken_reward_leaves_folders(
        cli, TINY, tiny_weaver, tmp_path, output, "helpers:broken_reward"
    )


def test_resume_after_interruption(tiny_base, tmp_path, monkeypatch):
    TARGET["tokens"] = set(range(0, 300, 2))  # every step learns something
    sets = ["training.max_steps=4", "reward.task_weight=0", "training.max_completion_length=2"]
    flags = {"rewards": ["test_baseline_grpo:first_token_reward"]}
    straight = stage.run(tiny_cfg(tiny_base, tmp_path / "a", *sets, **flags))
    cfg = tiny_cfg(tiny_base, tmp_path / "b", *sets, **flags)
    with pytest.raises(stage.TrainingInterrupted) as stop:
        stage.run(cfg, callbacks=[Capture(interrupt_at=1)])
    assert stop.value.checkpoint.name == "checkpoint-2"  # the step that was running
    assert stop.value.checkpoint.is_dir() and not Path(cfg.output).exists()
    with pytest.raises(MemgenError, match="--resume auto"):
        stage.run(cfg)
    resumed = stage.run(cfg, resume="auto")
    s = json.loads((resumed / "memgen.json").read_text())["training"]
    assert s["steps"] == 4 and s["resumed_from"].endswith("checkpoint-2")
    assert [r["step"] for r in rows(resumed / "metrics.jsonl") if "reward" in r] == [1, 2, 3, 4]
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # rollouts are regenerated from the checkpoint's RNG state: the same run
        assert torch.equal(a[name], b[name]), name
    rewards = [
        [r["reward"] for r in rows(o / "metrics.jsonl") if "reward" in r]
        for o in (straight, resumed)
    ]
    assert rewards[0] == rewards[1] and len(set(rewards[0])) > 1, rewards

    def interrupted(cfg, **_):
        raise stage.TrainingInterrupted(Path("somewhere/checkpoint-7"))

    monkeypatch.setattr(stage, "run", interrupted)
    result = cli(*common(tiny_base, tmp_path / "c"))
    assert result.exit_code == 130, result.output
    assert "continue with --resume auto" in " ".join(result.output.split())


def test_the_arithmetic_recipe_matches_grpo_weaver_and_the_sft_task():
    here = ROOT / "recipes" / "smollm2-135m" / "basic_arithmetic"
    mine, grpo, sft = (
        yaml.safe_load((here / f).read_text())
        for f in ("baseline-grpo.yaml", "grpo-weaver.yaml", "sft-weaver.yaml")
    )
    assert mine["data"]["options"] == sft["data"]["options"]
    assert {k: v for k, v in mine["data"].items() if k != "options"} == {
        k: v for k, v in grpo["data"].items() if k != "options"
    }
    weaver_only = ("memory", "log_completions_steps")
    assert mine["training"] == {k: v for k, v in grpo["training"].items() if k not in weaver_only}
    assert mine["memory"] == sft["memory"]
    assert mine.get("reward") == grpo.get("reward")  # the same rewards, plug-ins included
    init = yaml.safe_load((here / "baseline-sft.yaml").read_text())
    assert mine["init"] == init["output"]
    assert init["data"] == sft["data"] and init["memory"] == sft["memory"]
