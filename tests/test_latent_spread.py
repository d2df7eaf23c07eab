"""benchmarks/latent_spread.py: how much a weaver's prompt latents depend on the problem."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from memgen_cli.artifacts import load_artifact
from memgen_cli.config import GenerationConfig
from memgen_cli.generation import generate
from memgen_cli.generation.sampling import encode_prompts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spread():
    spec = importlib.util.spec_from_file_location(
        "bench_latent_spread", ROOT / "benchmarks" / "latent_spread.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mean_cosine_leaves_out_a_problem_paired_with_itself(spread):
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    half = 1 / math.sqrt(2)
    assert spread.mean_cosine(a, a, same=True) == pytest.approx((0 + half + half) / 3)
    assert spread.mean_cosine(a[:1], a[1:], same=False) == pytest.approx((0 + half) / 2)


def prompt_latents(model, questions):
    messages = [[{"role": "user", "content": q}] for q in questions]
    enc = encode_prompts(model.tokenizer, messages, "cpu")
    cfg = GenerationConfig(max_new_tokens=1, memory="weaver", temperature=0.0)
    out = generate(model, enc["input_ids"], enc["attention_mask"], cfg)
    woven = sorted((i for i in out.trace.insertions if i.kind == "prompt"), key=lambda i: i.row)
    return torch.stack([i.latents for i in woven])


def test_first_row_latents_hands_the_first_problems_latents_to_every_row(spread, tiny_weaver):
    model, _, _ = load_artifact(tiny_weaver[1], device="cpu")
    questions = ["What is 2 + 3?", "Spell cat backwards, please.", "Name a colour"]
    own = prompt_latents(model, questions)
    assert not torch.allclose(own[0], own[1]) and not torch.allclose(own[0], own[2])
    with spread.first_row_latents(model):
        swapped = prompt_latents(model, questions)
    assert all(torch.equal(row, own[0]) for row in swapped)
    assert torch.equal(prompt_latents(model, questions), own)  # the weaver as it was


def test_the_report_on_a_tiny_artifact(spread, tiny_weaver, tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_weaver[1], artifact)
    manifest = json.loads((artifact / "memgen.json").read_text())
    manifest["training"] = {"task": "gym:chain_sum", "task_options": {"config": {"max_terms": 2}}}
    (artifact / "memgen.json").write_text(json.dumps(manifest))
    specs = ["gym:chain_sum", "gym:basic_arithmetic"]
    result = spread.spread(str(artifact), specs, n=3, swap_n=4, batch=2)
    assert set(result["rms_over_embedding"]) == set(specs)
    assert all(v > 0 for v in result["rms_over_embedding"].values())
    assert all(-1 <= v <= 1 for v in result["cosine_within"].values())
    assert list(result["cosine_across"]) == ["gym:chain_sum ~ gym:basic_arithmetic"]
    swap = result["swap"]
    assert (swap["task"], swap["n"]) == ("gym:chain_sum", 4)
    moved = swap["swapped_minus_own"]
    counted = moved["row_only"] - moved["reference_only"]
    assert swap["accuracy_swapped"] - swap["accuracy_own"] == pytest.approx(100 * counted / 4)
    assert moved["diff"] == pytest.approx(counted / 4)
