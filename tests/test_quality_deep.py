"""benchmarks/quality_deep.py (``quality.py --table --deep``): rows, sweep, budget, pairs.

The pure parts on hand-built inputs: which rows run and which wait for their command, the sweep
and seed expansion, the choice of learning rate, the kv weaver's rank for an equal budget against
a hand count on a tiny config, the paired statistics on hand-built predictions. Then one run end
to end on a tiny Llama: two trainings as ``memgen`` child processes, one eval per task.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import make_model, tiny_config
from helpers import rows, write_problems
from memgen_cli.config import BaselineLoraConfig, MemoryConfig
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.stats import mcnemar_p, paired
from memgen_cli.models.memgen import MemGenModel

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROOT = BENCH.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deep():
    return load("quality_deep")


# ------------------------------------------------------------------------------ rows
def test_rows_follow_the_table_and_waiting_rows_say_why(deep, monkeypatch):
    monkeypatch.setattr(
        deep, "missing_option", lambda cmd, opt: "no --method yet" if "--method" in cmd else None
    )
    ready, waiting = deep.plan_rows(["lora", "prompt", "weaver-kv", "prefix"])
    assert ready == ["weaver-kv", "lora"]  # in the table's order, not the asking order
    assert waiting == {"prompt": "no --method yet", "prefix": "no --method yet"}
    with pytest.raises(MemgenError, match="unknown \\['vanilla'\\]"):
        deep.plan_rows(["lora", "vanilla"])
    # A new arm is one entry in the table.
    methods = {**deep.METHODS, "ia3": deep.Method("IA3", ("baseline", "sft"), "off", False)}
    assert deep.plan_rows(["ia3", "lora"], methods)[0] == ["lora", "ia3"]


def test_missing_option_reads_the_real_command_line(deep):
    assert deep.missing_option(("baseline", "sft"), "--recipe") is None
    assert deep.missing_option(("sft-weaver",), "--set") is None
    why = deep.missing_option(("baseline", "sft", "--x", "y"), "--no-such-option")
    assert why == "`memgen baseline sft` has no --no-such-option option yet"


def test_deep_options_need_the_deep_table(capsys):
    quality = load("quality")
    for argv, needs in (
        (["--deep"], "add --table"),
        (["--table", "--lr", "1e-3"], "add --table --deep"),
        (["--table", "--seeds", "1,2"], "add --table --deep"),
        (["--table", "--deep", "--use", "lora=runs/x"], "--deep trains its own"),
    ):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
        assert needs in capsys.readouterr().err
    args = quality.parse_args(["--table", "--deep", "--lr", "1e-3", "--lr", "lora=2e-3"])
    assert args.lr == ["1e-3", "lora=2e-3"] and args.rows is None and args.seeds is None


# ------------------------------------------------------------------------------ sweep and seeds
def test_sweep_at_the_first_seed_then_main_rows_at_the_others(deep):
    table = ["prompt", "weaver-input", "weaver-kv", "lora"]
    lrs = deep.parse_lrs([], table, 1e-3)
    assert lrs == dict.fromkeys(table, [0.00033, 0.001, 0.003])  # the recipe's ÷3, ×1, ×3
    lrs = deep.parse_lrs(["2e-3", "prompt=1e-2,3e-2"], table, 1e-3)  # later items win
    assert lrs == {**dict.fromkeys(table, [0.002]), "prompt": [0.01, 0.03]}
    assert deep.parse_lrs(["lora=1e-3", "5e-4"], ["lora"], 1e-3) == {"lora": [0.0005]}
    for bad in ("dora=1e-3", "0", "1e-3,x", "lora="):
        with pytest.raises(MemgenError, match="--lr"):
            deep.parse_lrs([bad], table, 1e-3)

    seeds = deep.parse_seeds("42,43,42,44", 0)
    assert seeds == [42, 43, 44] and deep.parse_seeds(None, 7) == [7, 8]
    with pytest.raises(MemgenError, match="whole numbers"):
        deep.parse_seeds("42,x", 0)

    lrs = deep.parse_lrs(["prompt=1e-2,3e-2"], table, 1e-3)
    sweep = deep.sweep_plan(table, lrs, seeds)
    assert len(sweep) == 2 + 3 * 3 and {r.seed for r in sweep} == {42}
    assert [r.name for r in sweep[:3]] == ["prompt-lr0.01-s42", "weaver-input-lr0.001-s42", "weaver-kv-lr0.001-s42"]  # fmt: skip
    assert [r.name for r in sweep[4:6]] == ["prompt-lr0.03-s42", "weaver-input-lr0.00033-s42"]  # fmt: skip
    chosen = {"prompt": 0.03, "weaver-input": 0.001, "weaver-kv": 0.003, "lora": 0.00033}
    extra = deep.seed_plan(table, chosen, seeds)
    assert [r.name for r in extra] == [
        "weaver-input-lr0.001-s43",
        "weaver-input-lr0.001-s44",
        "weaver-kv-lr0.003-s43",
        "weaver-kv-lr0.003-s44",
        "lora-lr0.00033-s43",
        "lora-lr0.00033-s44",
    ]  # prompt tuning is not a main row: the first seed only
    assert deep.seed_plan(table, chosen, [42]) == []
    names = [r.name for r in sweep + extra]
    assert len(set(names)) == len(names)


def test_rate_with_the_lowest_heldout_loss_is_kept(deep):
    Run = deep.Run
    runs = [Run("kv", 1e-4, 0), Run("kv", 1e-3, 0), Run("kv", 1e-2, 0), Run("lora", 1e-3, 0)]
    losses = {"kv-lr0.0001-s0": 1.2, "kv-lr0.001-s0": 0.9, "kv-lr0.01-s0": 0.9}
    assert deep.choose_lr(runs, losses) == {"kv": 1e-3, "lora": 1e-3}  # a tie: the lower rate
    with pytest.raises(MemgenError, match="data.heldout"):
        deep.choose_lr(runs, {**losses, "kv-lr0.01-s0": None})
    manifest = {"training": {"heldout_loss": {"memory_off": 2.0, "weaver_final": 1.5}}}
    assert deep.final_loss(manifest) == 1.5
    assert deep.final_loss({"training": {}}) is None


# ------------------------------------------------------------------------------ budget
def test_kv_rank_for_the_lora_baselines_budget_matches_a_hand_count(deep):
    # tiny Llama: hidden 32, 4 heads of 8, 2 KV heads, 2 layers; memory defaults K 8 + 8, r 16
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", 300))
    q, k, v = 32 + 32, 32 + 16, 32 + 16  # per rank: A (r x in) + B (out x r), per layer
    own_kv = (8 + 8) * 32 + 2 * (32 + 32) + 2  # queries, two LayerNorms, two scales
    own_input = own_kv + 2 * (32 * 32 + 32)  # + the two projections (none with kv)
    weaver = 16 * 2 * (q + v) + own_input  # 6,338
    lora_rank = round(weaver / (2 * (q + v)))  # 28: what `baseline sft` matches
    lora = lora_rank * 2 * (q + v)  # 6,272
    kv_rank = round((lora - own_kv) / (2 * (q + k + v)))  # 18
    budget = deep.kv_budget(model, MemoryConfig(), BaselineLoraConfig())
    assert budget == {
        "kv_rank": kv_rank,
        "kv_alpha": 2 * kv_rank,  # the recipe's alpha / r = 32 / 16
        "kv_targets": ["q_proj", "k_proj", "v_proj"],
        "kv_trainable_params": own_kv + kv_rank * 2 * (q + k + v),
        "kv_prefix": False,
        "inject": "kv",
        "weaver_reads": "context",
        "lora_rank": lora_rank,
        "lora_trainable_params": lora,
        "input_trainable_params": weaver,
        "gap": round((own_kv + kv_rank * 2 * (q + k + v)) / lora - 1, 4),
    }
    assert (lora_rank, lora, kv_rank, budget["kv_trainable_params"]) == (28, 6272, 18, 6402)
    # said, not left to the recipe (the table's has memory.kv_prefix: true)
    assert deep.kv_sets(budget)[-1] == "memory.kv_prefix=false"
    assert abs(budget["gap"]) <= 0.05

    # ... and the kv weaver built with those settings trains exactly that many parameters.
    reasoner, tok = make_model()
    memory = MemoryConfig(inject="kv", lora_targets=budget["kv_targets"], lora_r=kv_rank)
    mg = MemGenModel(reasoner, tok, memory)
    mg.set_trainable(weaver=True, trigger=False)
    assert sum(p.numel() for p in mg.trainable_parameters()) == budget["kv_trainable_params"]


def test_kv_prefix_budget_counts_the_prefix_and_lowers_the_rank(deep):
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", 300))
    q, k, v = 32 + 32, 32 + 16, 32 + 16
    own = (8 + 8) * 32 + 2 * (32 + 32) + 2 + 2 * 2 * 2 * 8 * (8 + 8)  # + keys and values:
    # 2 layers x 2 KV heads x head dim 8 per slot, 16 slots
    budget = deep.kv_budget(model, MemoryConfig(), BaselineLoraConfig(), prefix=True)
    rank = round((6272 - own) / (2 * (q + k + v)))
    assert (budget["kv_rank"], budget["kv_trainable_params"]) == (
        rank,
        own + rank * 2 * (q + k + v),
    )
    assert (rank, budget["kv_prefix"]) == (14, True)
    assert deep.kv_sets(budget)[-1] == "memory.kv_prefix=true"
    reasoner, tok = make_model()
    memory = MemoryConfig(
        inject="kv", kv_prefix=True, lora_targets=budget["kv_targets"], lora_r=rank
    )
    mg = MemGenModel(reasoner, tok, memory)
    mg.set_trainable(weaver=True, trigger=False)
    assert sum(p.numel() for p in mg.trainable_parameters()) == budget["kv_trainable_params"]


def test_input_prefix_budget_lowers_the_input_weavers_rank(deep):
    """The input weaver with ``memory.kv_prefix``: its own tensors (projections included) and
    the prefix, the rest LoRA on the recipe's targets, within 5 % of LoRA-SFT's count."""
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", 300))
    q, v = 32 + 32, 32 + 16
    own = (8 + 8) * 32 + 2 * (32 + 32) + 2 + 2 * (32 * 32 + 32) + 2 * 2 * 2 * 8 * (8 + 8)
    budget = deep.kv_budget(
        model, MemoryConfig(), BaselineLoraConfig(), prefix=True, inject="input"
    )
    rank = round((6272 - own) / (2 * (q + v)))  # 6,272: LoRA-SFT's count (above)
    assert budget["kv_targets"] == ["q_proj", "v_proj"] and budget["inject"] == "input"
    assert (rank, budget["kv_rank"], budget["kv_trainable_params"]) == (
        11,
        rank,
        own + rank * 2 * (q + v),
    )
    assert deep.kv_sets(budget) == [
        "memory.lora_r=11",
        "memory.lora_alpha=22",
        "memory.kv_prefix=true",
    ]
    reasoner, tok = make_model()
    memory = MemoryConfig(kv_prefix=True, lora_r=rank, lora_alpha=2 * rank)
    mg = MemGenModel(reasoner, tok, memory)
    mg.set_trainable(weaver=True, trigger=False)
    assert sum(p.numel() for p in mg.trainable_parameters()) == budget["kv_trainable_params"]


def test_a_weaver_that_reads_the_cache_raises_its_rank_for_the_projection_it_lacks(deep):
    """``memory.weaver_reads: cache`` has no ``reasoner_to_weaver``: its own tensors are the
    input weaver's less that map, so its LoRA rank rises to meet the same count."""
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", 300))
    q, v = 32 + 32, 32 + 16
    own = (8 + 8) * 32 + 2 * (32 + 32) + 2 + (32 * 32 + 32) + 2 * 2 * 2 * 8 * (8 + 8)
    budget = deep.kv_budget(
        model, MemoryConfig(), BaselineLoraConfig(), prefix=True, inject="input", reads="cache"
    )
    rank = round((6272 - own) / (2 * (q + v)))
    assert (rank, budget["kv_rank"], budget["kv_trainable_params"]) == (
        16,
        rank,
        own + rank * 2 * (q + v),
    )
    assert deep.kv_sets(budget)[-1] == "memory.weaver_reads=cache"
    reasoner, tok = make_model()
    memory = MemoryConfig(kv_prefix=True, lora_r=rank, lora_alpha=2 * rank, weaver_reads="cache")
    mg = MemGenModel(reasoner, tok, memory)
    mg.set_trainable(weaver=True, trigger=False)
    assert sum(p.numel() for p in mg.trainable_parameters()) == budget["kv_trainable_params"]
    rows = deep.row_sets(deep.METHODS["weaver-inputpc"], {(False, True, "cache"): budget})
    assert rows == deep.kv_sets(budget)


def test_every_weaver_row_says_its_memory_and_the_baselines_take_the_recipes(deep):
    """A recipe with the prefix on (the table's) must not give it to the rows without one."""
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", 300))
    recipe = MemoryConfig(kv_prefix=True, lora_r=11, lora_alpha=22)
    for row, method in deep.METHODS.items():
        key = (method.kv, method.prefix, method.reads)
        weaver = method.command == ("sft-weaver",)
        budgets = {}
        if weaver:
            inject = "kv" if method.kv else "input"
            budgets[key] = deep.kv_budget(
                model, recipe, BaselineLoraConfig(), prefix=method.prefix, inject=inject,
                reads=method.reads,
            )  # fmt: skip
        sets = deep.row_sets(method, budgets)
        prefix = f"memory.kv_prefix={'true' if method.prefix else 'false'}"
        assert (prefix in sets) if weaver else sets == [], row
        assert ("memory.weaver_reads=cache" in sets) == (method.reads == "cache"), row


def test_a_budget_kv_cannot_meet_is_refused(deep):
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config("llama", 300))
    # LoRA r 1 on q, v: 224 parameters, fewer than the kv weaver's own 642.
    with pytest.raises(MemgenError, match="±5 % of LoRA-SFT's 224"):
        deep.kv_budget(model, MemoryConfig(), BaselineLoraConfig(r=1))


# ------------------------------------------------------------------------------ pairs
def predictions(artifact: str, mode: str, solved: str) -> list[dict]:
    """One eval row's predictions: problem i solved where ``solved[i]`` is 1."""
    return [
        {"task": "t", "artifact": artifact, "mode": mode, "index": i, "correct": c == "1"}
        for i, c in enumerate(solved)
    ]


def test_pairs_from_one_eval_runs_predictions(deep):
    Run = deep.Run
    runs = {
        "weaver-input": [Run("weaver-input", 1e-3, 1), Run("weaver-input", 1e-3, 2)],
        "weaver-kv": [Run("weaver-kv", 3e-3, 1), Run("weaver-kv", 3e-3, 2)],
        "prompt": [Run("prompt", 1e-2, 1)],  # not a main row: one seed
    }
    paths = {r.name: Path("out") / r.name for rs in runs.values() for r in rs}
    solved = {  # 10 problems; seed 1: kv alone solves 4, input alone 1 -> +30 points, p 0.375
        "weaver-input-lr0.001-s1": "1100000000",
        "weaver-kv-lr0.003-s1": "1011110000",
        "weaver-input-lr0.001-s2": "1111100000",
        "weaver-kv-lr0.003-s2": "1111100000",  # the same answers: +0, p 1
        "prompt-lr0.01-s1": "0000000001",
    }
    preds = [p for name, s in solved.items() for p in predictions(str(paths[name]), deep.METHODS[name.split("-lr")[0]].mode, s)]  # fmt: skip
    preds += predictions(str(paths["weaver-kv-lr0.003-s1"]), "off", "0" * 10)
    correct = deep.correctness(preds)
    out = deep.pairs(["prompt", "weaver-input", "weaver-kv"], runs, paths, {"t": (None, correct)})
    assert [p["pair"] for p in out] == [
        "weaver-kv − weaver-input",  # the question first
        "weaver-kv − prompt",
        "weaver-input − prompt",
    ]
    kv_input = out[0]["t"]
    assert out[0]["seeds"] == [1, 2] and out[1]["seeds"] == [1]
    s1, s2 = kv_input["per_seed"]
    assert (s1["seed"], s1["reference_only"], s1["row_only"]) == (1, 1, 4)
    assert s1["diff"] == pytest.approx(0.3) and s1["mcnemar_p"] == 0.375 == mcnemar_p(1, 4)
    assert s1 == {"seed": 1, **paired([c == "1" for c in "1100000000"], [c == "1" for c in "1011110000"])}  # fmt: skip
    assert (s2["diff"], s2["mcnemar_p"]) == (0.0, 1.0)
    assert kv_input["mean_diff"] == pytest.approx(0.15)
    kv_prompt = out[1]["t"]["per_seed"]
    assert len(kv_prompt) == 1 and kv_prompt[0]["diff"] == pytest.approx(0.4)

    vanilla = (str(paths["weaver-kv-lr0.003-s1"]), "off")
    vs = deep.paired_on(correct, vanilla, (str(paths["weaver-kv-lr0.003-s1"]), "weaver"))
    assert (vs["diff"], vs["row_only"], vs["reference_only"]) == (0.5, 5, 0)
    short = deep.correctness(predictions("x", "off", "101"))
    with pytest.raises(RuntimeError, match="different problems"):
        deep.paired_on({**correct, **short}, vanilla, ("x", "off"))


# ------------------------------------------------------------------------------ end to end
def test_tiny_deep_table_end_to_end(deep, tiny_base, tmp_path, monkeypatch, one_thread):
    """weaver-SFT (kv) and LoRA-SFT on a tiny Llama, one rate and seed each: the artifacts,
    their records, counts as planned, pairs that agree with the predictions, Markdown; then
    ``--reuse`` trains nothing."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child processes: tiny models, busy cores
    quality = load("quality")
    data = write_problems(tmp_path / "train.jsonl", 12)
    out = tmp_path / "deep"
    argv = [
        "--table", "--deep", "--recipe", str(ROOT / "recipes/tiny/sft-weaver.yaml"),
        "--set", f"model.base={tiny_base}", "--set", f"data.task={data}",
        "--set", "data.size=8", "--set", "training.max_steps=2",
        "--rows", "weaver-kv,lora", "--lr", "1e-3", "--seeds", "0",
        "--n", "3", "--cross-n", "2", "--max-new-tokens", "6", "--batch-size", "4",
        "--output", str(out),
    ]  # fmt: skip
    result = deep.run(quality.parse_args(argv))
    json.dumps(result)
    names = ["weaver-kv-lr0.001-s0", "lora-lr0.001-s0"]
    evals = ["deep-train", "deep-gym-chain_sum"]
    assert {p.name for p in out.iterdir()} == {*names, *evals, "deep-runs.json"}
    records = json.loads((out / "deep-runs.json").read_text())
    assert set(records) == set(names)
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in records.values())
    assert records[names[0]]["command"].startswith("memgen sft-weaver --recipe")
    assert "memory.inject=kv" in records[names[0]]["command"]
    assert records[names[1]]["command"].startswith("memgen baseline sft --recipe")

    budget = result["budget"]
    kv, lora = result["table"]
    assert (kv["row"], lora["row"]) == ("weaver-kv", "lora")
    assert kv["trainable_params"] == budget["kv_trainable_params"]
    assert lora["trainable_params"] == budget["lora_trainable_params"]
    assert abs(budget["gap"]) <= 0.05
    assert kv["train_cpu_s"] == records[names[0]]["cpu_s"] == kv["sweep_cpu_s"]
    tasks = list(result["tasks"])
    assert tasks[1] == "gym:chain_sum" and result["tasks"][tasks[0]]["n"] == 3
    for task in tasks:
        assert kv[task]["per_seed"][0]["vs_vanilla"]["mcnemar_p"] <= 1.0
        assert kv[task]["answers_per_s"] > 0 and lora[task]["answers_per_s"] > 0

    (pair,) = result["pairs"]
    assert pair["pair"] == "weaver-kv − lora"
    for task in tasks:
        got = {
            (p["artifact"], p["mode"], p["index"]): p["correct"]
            for p in rows(Path(result["eval_outputs"][task]) / "predictions.jsonl")
        }
        ids = sorted({i for (_, _, i) in got})
        a = [got[(str(out / names[1]), "off", i)] for i in ids]
        b = [got[(str(out / names[0]), "weaver", i)] for i in ids]
        assert pair[task]["per_seed"] == [{"seed": 0, **paired(a, b)}]

    md = deep.markdown_table(result)
    assert "| weaver-SFT (kv) | 0.001 | 0 |" in md and "| LoRA-SFT | 0.001 | 0 |" in md
    assert "| weaver-kv − lora |" in md and "**0.001**" in md
    assert f"weaver-SFT (kv) {budget['kv_trainable_params']:,}" in md

    stamp = (out / names[0] / "memgen.json").stat().st_mtime_ns
    again = deep.run(quality.parse_args([*argv, "--reuse"]))
    assert (out / names[0] / "memgen.json").stat().st_mtime_ns == stamp  # not retrained
    assert json.loads((out / "deep-runs.json").read_text()) == records
    assert again["table"][0]["train_cpu_s"] == kv["train_cpu_s"]
