"""GRPO rollout speed against Hugging Face ``generate``, and where one GRPO step's time goes.

Rollouts: G completions for each of P prompts (EOS ignored, so every path does the same work),
sampled at temperature 1. Ours prefills and weaves each prompt once and copies its caches to
the G rows; HF's ``generate(num_return_sequences=G)`` runs the prompt G times. HF, memory off,
the input weaver (``memory.inject: input``, the paper's) and the kv weaver (``memory.inject:
kv``: a second copy of the reasoner whose weaver writes keys and values into its cache, the
same memory settings otherwise) are timed in the same interleaved rounds and reported as ratios
to HF (lower is faster; targets on the 2-core CPU: ``rollout_off_vs_hf`` <= 0.95,
``rollout_weaver_vs_hf`` <= 1.4), with ``rollout_kv_vs_hf``, ``kv_over_input`` (kv rollout
time / input rollout time) and ``answers_per_s`` (completions per second: hf, off, input, kv).

Step breakdown, as ``grpo-weaver`` runs one step: ``rollout_s`` (weaver rollouts), ``score_s``
(the task's grader), ``loss_s`` (log-probs through the batched training forward at the trace's
insertion points, the clipped loss, backward); ``step`` for the input weaver, ``step_kv`` for
the kv weaver.

    .venv/bin/python benchmarks/grpo.py                      # defaults: P=4, G=8, 128 tokens
    .venv/bin/python benchmarks/grpo.py --prompts 2 --generations 2 --max-new-tokens 8  # smoke

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memgen_cli.cli import quiet_libraries
from memgen_cli.config import GenerationConfig, MemoryConfig
from memgen_cli.data import get_task, to_messages
from memgen_cli.generation import encode_prompts
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.training import rl
from memgen_cli.training.rollouts import policy_inputs, policy_logprobs, rollout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import best_of  # noqa: E402


def positions(roll, k: int, prompt_k: int, kv: bool = False) -> dict:
    """Positions each path runs per completion, from the trace: decode steps; the weaver's
    (the tokens a row wrote since its last weave, the latents it inserted then, K queries);
    latent chunks through the reasoner (K per insertion). ``position_ratio`` = (decode +
    weaver + latents) / decode is what weaving multiplies the work by; the time ratio
    ``rollout_weaver_s / rollout_off_s`` stays below it because a weaver pass or a latent
    chunk runs many positions per row at once, which costs less per position than decode
    steps of one position per row. With ``kv`` the weaver keeps its slots in its own cache
    (it never re-reads the latents) and the reasoner runs no latent chunk: its slots are
    written into its cache."""
    decode = weaver = latents = 0
    for ids, points in zip(roll.completion_ids, roll.inference_points, strict=True):
        decode += len(ids)
        last, previous = 0, 0 if kv else prompt_k
        for t in points:
            weaver += (t - last) + previous + k
            latents += 0 if kv else k
            last, previous = t, 0 if kv else k
    n = len(roll.completion_ids)
    return {
        "decode": round(decode / n, 1),
        "weaver": round(weaver / n, 1),
        "latents": round(latents / n, 1),
        "position_ratio": round((decode + weaver + latents) / max(decode, 1), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--task", default="gsm_symbolic")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--loss-rows",
        type=int,
        default=8,
        help="completions per backward in the step's loss (all 32 at once took 23 GB on CPU)",
    )
    a = ap.parse_args()
    quiet_libraries()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    task = get_task(a.task)
    examples = task.load("test", limit=a.prompts)
    messages = [to_messages(e, "Put your final answer within \\boxed{}.") for e in examples]
    g, n = a.generations, a.max_new_tokens

    plain = load_base(a.base, a.device)  # a separate copy without LoRA layers, for HF
    enc = encode_prompts(plain.tokenizer, messages, plain.model.device)

    def hf():
        plain.model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=n,
            min_new_tokens=n,  # EOS suppressed: every row makes n tokens
            num_return_sequences=g,
            pad_token_id=plain.tokenizer.pad_token_id,
        )

    models = {}
    for inject in ("input", "kv"):  # a copy each: the weaver's LoRA wraps its reasoner in place
        b = load_base(a.base, a.device)
        models[inject] = MemGenModel(b.model, b.tokenizer, MemoryConfig(inject=inject)).eval()

    def ours(inject: str, memory: str):
        cfg = GenerationConfig(max_new_tokens=n, temperature=1.0, memory=memory, ignore_eos=True)
        return lambda: rollout(models[inject], messages, cfg, g)

    paths = {
        "hf": hf,
        "off": ours("input", "off"),
        "input": ours("input", "weaver"),
        "kv": ours("kv", "weaver"),
    }
    with torch.no_grad():
        hf()  # warm-up (allocator, kernels)
        ours("input", "weaver")()
        ours("kv", "weaver")()
        best = dict(zip(paths, best_of(a.repeats, list(paths.values())), strict=True))

    steps = {
        inject: grpo_step(model, task, examples, messages, n, g, a.loss_rows)
        for inject, model in models.items()
    }
    model = models["input"]
    answers = len(messages) * g
    print(
        json.dumps(
            {
                "base": a.base,
                "prompts": a.prompts,
                "generations": g,
                "max_new_tokens": n,
                "threads": torch.get_num_threads(),
                "loss_rows": a.loss_rows,
                "hf_generate_s": round(best["hf"], 3),
                "rollout_off_s": round(best["off"], 3),
                "rollout_weaver_s": round(best["input"], 3),
                "rollout_kv_s": round(best["kv"], 3),
                "rollout_off_vs_hf": round(best["off"] / best["hf"], 3),
                "rollout_weaver_vs_hf": round(best["input"] / best["hf"], 3),
                "rollout_kv_vs_hf": round(best["kv"] / best["hf"], 3),
                "kv_over_input": round(best["kv"] / best["input"], 3),
                "answers_per_s": {name: round(answers / t, 3) for name, t in best.items()},
                "insertions_per_completion": steps["input"][1],
                "insertions_per_completion_kv": steps["kv"][1],
                "positions_per_completion": positions(
                    steps["input"][2], model.cfg.inference_latents, model.cfg.prompt_latents
                ),
                "positions_per_completion_kv": positions(
                    steps["kv"][2], model.cfg.inference_latents, model.cfg.prompt_latents, kv=True
                ),
                "step": steps["input"][0],  # the input weaver's
                "step_kv": steps["kv"][0],
            }
        )
    )


def grpo_step(model: MemGenModel, task, examples, messages, n: int, g: int, loss_rows: int):
    """One GRPO step, as the trainer runs it (rollout -> rewards -> loss + backward): (its
    seconds by part, inference insertions per completion, the rollout)."""
    model.set_trainable(weaver=True, trigger=False)
    start = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=n, temperature=1.0, memory="weaver")
    roll = rollout(model, messages, cfg, g)
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    text = model.tokenizer.batch_decode(roll.texts_ids, skip_special_tokens=True)
    group = [e for e in examples for _ in range(g)]
    _, rewards = rl.score(
        [rl.task_reward(task)], [1.0], [None] * len(text), text, rl.example_columns(group)
    )
    adv, _ = rl.group_advantages(rewards, g)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    b = policy_inputs(roll, model.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "completion_index", "completion_mask")
    rows = b["input_ids"].shape[0]
    for lo in range(0, rows, loss_rows):  # micro-batches, as the trainer's accumulation
        part = slice(lo, lo + loss_rows)
        prompt_points = b["prompt_points"][part] if b["prompt_points"] is not None else None
        logps, _ = policy_logprobs(
            model,
            *(b[k][part].to(model.device) for k in keys),
            prompt_points,
            b["inference_points"][part],
        )
        mask = b["completion_mask"][part].to(model.device)
        loss = rl.policy_loss(logps, logps.detach(), adv[part].to(model.device), mask).loss
        (loss * logps.shape[0] / rows).backward()
    loss_s = time.perf_counter() - start
    step = {
        "rollout_s": round(rollout_s, 3),
        "score_s": round(score_s, 3),
        "loss_s": round(loss_s, 3),
    }
    return step, sum(map(len, roll.inference_points)) / len(text), roll


if __name__ == "__main__":
    main()
