"""`memgen baseline grpo` on TextWorld games: TRL's GRPOTrainer with a rollout function that
plays episodes through memgen's engine (training/lora_episodes.py). Real games (made offline,
cached for the session), the tiny textworld recipe on a 2-layer Llama."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import make_model
from helpers import BASELINE_ARTIFACT_FILES, invoke, rows
from memgen_cli.data import get_task
from memgen_cli.errors import MemgenError
from memgen_cli.generation import EpisodeConfig
from memgen_cli.models.base import load_base
from memgen_cli.stages import baseline_grpo as stage
from memgen_cli.training.lora_episodes import (
    EpisodeRollout,
    agent_ids,
    episode_completion,
    player_for,
)
from stage_runs import finished_run

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(find_spec("textworld") is None, reason="textworld is not installed"),
]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "textworld" / "grpo-weaver.yaml"


def odd_tokens(prompts, completions, completion_ids, **_):
    """The agent's tokens with an odd id: a reward that differs between sampled episodes where
    a random tiny model never wins and names no command (every reply cut at the limit)."""
    return [float(sum(t % 2 for t in ids)) for ids in completion_ids]


def trainer_like(policy, **args):
    """What the rollout function reads of TRL's trainer."""
    settings = dict(seed=0, max_completion_length=4, temperature=1.0, top_p=1.0, process_index=0)
    return SimpleNamespace(
        args=SimpleNamespace(**{**settings, **args}),
        model=policy,
        state=SimpleNamespace(global_step=0),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )


def test_rollout_is_the_played_transcript_with_environment_tokens_masked(cached):
    model, tok = make_model("llama")
    player = player_for(model, tok)  # before LoRA wraps the model, as the stage does
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(model, lora).eval()  # B random: the adapter changes the reasoner
    task = get_task("textworld:coin_collector", level=5, max_turns=3, exclude_train=4)
    games = task.load("train", 2)
    rollout = EpisodeRollout(player, task, games, EpisodeConfig(3), None, mask_truncated=False)
    seen, real = [], rollout.play

    def play(*args, **kwargs):
        seen.extend(real(*args, **kwargs))
        return seen

    rollout.play = play
    prompts = [g.id for g in games for _ in range(2)]  # TRL's RepeatSampler: G=2 in a row
    out = rollout(prompts, trainer_like(policy, max_completion_length=6))

    assert len(out["completion_ids"]) == 4 and [ep.turns for ep in seen] == [3, 3, 3, 3]
    for e, ep in enumerate(seen):
        prompt, ids, mask, logps = (out[k][e] for k in ("prompt_ids", "completion_ids", "env_mask", "logprobs"))  # fmt: skip
        assert prompt == ep.prompt_ids and len(ids) == len(mask) == len(logps)
        # The completion decodes to exactly the conversation the engine played (its replies as
        # sampled, special tokens kept), up to the end of its last reply: a stopped reply ends
        # with its <|im_end|>, a cut one does not.
        replies = iter(tok.decode(r) for r in ep.replies)
        messages = [
            {**m, "content": next(replies)} if m["role"] == "assistant" else m
            for m in ep.messages[:-1]
        ]
        played = tok.apply_chat_template(messages, tokenize=False)
        end = "\n" if ep.stops[-1] is not None else "<|im_end|>\n"
        assert tok.decode(prompt + ids) + end == played
        # The mask is 1 on exactly the agent's tokens (replies and stop tokens); every
        # environment token is masked out and carries log-prob 0.
        turns = _agent_positions(ep, ids)
        at = [i for turn in turns for i in turn]
        assert [i for i, m in enumerate(mask) if m] == at and len(at) < len(ids)
        assert [ids[i] for i in at] == out["agent_ids"][e] == agent_ids(ep)
        assert all(logps[i] == 0.0 for i in range(len(ids)) if not mask[i])
        assert out["invalid"][e] == ep.invalid and out["won"][e] == ep.won
        # mask_truncated_completions: the replies cut at the limit leave the mask, each alone.
        stopped = [i for t, turn in enumerate(turns) if ep.stops[t] is not None for i in turn]
        cut = episode_completion(ep, mask_truncated=True)[1]
        assert [i for i, m in enumerate(cut) if m] == stopped
        # The engine played the PEFT policy: its sampling-time log-probs are the policy's own
        # teacher-forced ones (temperature 1) at every agent token.
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        theirs = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logps)[at], theirs[at], atol=1e-4, rtol=0)


def _agent_positions(ep, ids) -> list[list[int]]:
    """Per turn, the positions in the completion of the tokens the agent chose."""
    turns, pos = [], 0
    for t in range(ep.turns):
        n = len(ep.replies[t]) + (ep.stops[t] is not None)
        turns.append(list(range(pos, pos + n)))
        pos += n
        if t < len(ep.breaks):
            brk = ep.breaks[t]
            pos += len(brk) - (ep.stops[t] is not None and brk[:1] == [ep.stops[t]])
    assert pos == len(ids)
    return turns


def test_baseline_grpo_trains_a_lora_on_games_and_eval_plays_it(
    cached, tiny_base, tmp_path, monkeypatch
):
    sets = [
        "data.heldout=1",
        "reward.functions=[test_baseline_grpo_games:odd_tokens]",
        "reward.weights=[1.0]",
        "training.max_completion_length=6",
        "training.mask_truncated_completions=false",  # a random model's replies are all cut
    ]
    cfg = stage.resolve_config(RECIPE, sets, base=str(tiny_base), output=tmp_path / "out")
    outputs, real = [], EpisodeRollout.__call__
    monkeypatch.setattr(EpisodeRollout, "__call__", lambda s, p, t: outputs.append(real(s, p, t)) or outputs[-1])  # fmt: skip
    out, manifest, _ = finished_run(stage, cfg, BASELINE_ARTIFACT_FILES)

    s = manifest["training"]
    assert (s["samples"], s["heldout_samples"], s["steps"]) == (2, 1, 2)
    assert s["episodes"] == {"max_turns": 3}
    assert set(s["heldout_accuracy"]) == {"initial", "final"}
    assert all(0.0 <= v <= 1.0 for v in s["heldout_accuracy"].values())
    # TRL read the env_mask: its completion lengths count the agent's tokens only.
    logged = [r for r in rows(out / "metrics.jsonl") if "completions/mean_length" in r]
    assert len(logged) == len(outputs) == 2
    for r, o in zip(logged, outputs, strict=True):
        mean = sum(map(sum, o["env_mask"])) / len(o["env_mask"])
        assert r["completions/mean_length"] == pytest.approx(mean)
        assert mean < sum(map(len, o["completion_ids"])) / len(o["completion_ids"])
        assert {"episodes/won", "episodes/turns", "episodes/invalid_rate"} <= set(r)
    # The fresh LoRA's B started at zero: training moved it. A plain PEFT adapter.
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())
    assert all("lora_" in k for k in tensors)
    PeftModel.from_pretrained(load_base(str(tiny_base), "cpu").model, str(out))

    # memgen eval plays it as a row on the task's test games.
    result = invoke(
        *("eval", "--artifact", out, "--data", "textworld:coin_collector", "--limit", 1),
        *("--max-new-tokens", 4, "--output", tmp_path / "eval", "--json"),
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    [row] = metrics["results"]
    assert (row["mode"], row["n"]) == ("off", 1)
    assert 1 <= row["mean_steps"] <= 3 and row["weaves_per_episode"] == 0


def test_games_sharing_an_id_are_refused(cached):
    model, tok = make_model("llama")
    task = get_task("textworld:coin_collector", level=5, max_turns=3, exclude_train=4)
    games = task.load("train", 2)
    with pytest.raises(MemgenError, match="share an id"):
        EpisodeRollout(player_for(model, tok), task, [games[0], games[0]], EpisodeConfig(3), None, False)  # fmt: skip
