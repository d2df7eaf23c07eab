"""benchmarks/quality_kept.py (``quality.py --table --kept``): what each row keeps on tasks it was
never trained for.

The pure parts (rows, the choice of tasks, options) on hand-built inputs; then the block end to
end on the tiny Llama: a weaver's vanilla and weaver rows and a retrieval store, the choice measured
on two candidate tasks, every row on the same problems, paired differences against memory off
checked against the eval's own predictions; and ``quality.py --table --kept`` wired to it.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from rich.console import Console

from helpers import rows, write_problems
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.stats import paired
from memgen_cli.stages import retrieval

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROOT = BENCH.parent
TASKS = "gym:letter_counting,gym:syllogism"

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kept():
    return load("quality_kept")


@pytest.fixture(scope="module")
def artifacts(tiny_weaver, tmp_path_factory) -> dict:
    base, weaver = tiny_weaver
    tmp = tmp_path_factory.mktemp("kept")
    cfg = retrieval.resolve_config(
        ROOT / "recipes" / "tiny" / "sft-weaver.yaml",
        [],
        base=str(base),
        data=str(write_problems(tmp / "train.jsonl", 10)),
        output=tmp / "retrieval",
    )
    store = retrieval.run(cfg, console=Console(file=open(os.devnull, "w")))
    return {"weaver": weaver, "retrieval": store, "tmp": tmp}


def test_doctests_and_the_choice(kept):
    result = doctest.testmod(kept)
    assert result.attempted >= 4 and result.failed == 0
    accuracy = {"a": 0.30, "b": 0.09, "c": 0.30, "d": 0.50, "e": 0.10}
    assert kept.choose(accuracy, 3, 0.10) == ["a", "c", "d"]  # the best three, candidate order
    assert kept.choose(accuracy, 2, 0.10) == ["a", "d"]  # a tie at the cut: the earlier one
    assert kept.choose(accuracy, 9, 0.10) == ["a", "c", "d", "e"]  # 9.9 % is below 10 %
    assert set(kept.CANDIDATES).isdisjoint({"gym:basic_arithmetic", "gym:chain_sum"})


def test_options_of_the_table_and_of_the_block(kept, capsys):
    quality = load("quality")
    for argv, needs in (
        (["--kept"], "add --table"),
        (["--table", "--deep", "--kept"], "leave out --deep"),
        (["--table", "--kept", "--kept-count", "0"], "at least 1"),
        (["--table", "--kept", "--kept-threshold", "10"], "between 0 and 1"),
        (["--table", "--kept", "--kept-artifact", "runs/x"], "NAME=DIR"),
    ):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
        assert needs in capsys.readouterr().err
    args = quality.parse_args(["--table", "--kept", "--kept-artifact", "retrieval=runs/r"])
    assert (args.kept_count, args.kept_threshold, args.kept_n, args.kept_tasks) == (
        3,
        0.1,
        200,
        None,
    )
    assert kept.split(args.kept_candidates) == list(kept.CANDIDATES)
    table = [{"row": "vanilla", "artifact": "w", "mode": "off", "train_s": 3}]
    assert kept.block_rows(table, args.kept_artifact)[1] == {
        "row": "retrieval",
        "artifact": "runs/r",
        "mode": "off",
    }


def test_the_block_end_to_end_on_the_same_problems(kept, artifacts, capsys):
    weaver, store, tmp = artifacts["weaver"], artifacts["retrieval"], artifacts["tmp"]
    argv = [
        "--row", f"vanilla={weaver}:off", "--row", f"weaver-sft={weaver}:weaver",
        "--kept-artifact", f"retrieval={store}",
        "--kept-candidates", TASKS, "--kept-count", "1", "--kept-threshold", "0",
        "--kept-select-n", "3", "--kept-n", "4", "--max-new-tokens", "3", "--batch-size", "4",
        "--output", tmp / "out", "--markdown", tmp / "results.md",
    ]  # fmt: skip
    kept.main([str(a) for a in argv])
    block = json.loads(capsys.readouterr().out)["kept"]
    assert [(r["row"], r["mode"]) for r in block["rows"]] == [
        ("vanilla", "off"),
        ("weaver-sft", "weaver"),
        ("retrieval", "off"),
    ]
    choice = block["choice"]
    assert set(choice["candidates"]) == set(TASKS.split(","))
    assert all(c["n"] == 3 for c in choice["candidates"].values())
    assert choice["tasks"] == kept.choose(
        {t: c["accuracy"] for t, c in choice["candidates"].items()}, 1, 0.0
    )
    [task] = choice["tasks"]
    assert block["tasks"][task]["n"] == 4
    preds = rows(tmp / "out" / f"kept-{task.replace(':', '-')}" / "predictions.jsonl")
    solved = {}
    for p in preds:
        solved.setdefault((p["artifact"], p["mode"]), {})[p["index"]] = p["correct"]
    keys = [(str(weaver), "off"), (str(weaver), "weaver"), (str(store), "off")]
    assert all(sorted(solved[k]) == [0, 1, 2, 3] for k in keys)  # the same problems, every row
    for r, key in zip(block["rows"], keys, strict=True):
        cell = r[task]
        assert cell["n"] == 4 and cell["accuracy"] == 100 * sum(solved[key].values()) / 4
        expected = (
            None
            if key == keys[0]
            else paired([solved[keys[0]][i] for i in range(4)], [solved[key][i] for i in range(4)])
        )
        assert cell["vs_off"] == expected
    assert block["rows"][1][task]["insertions_per_answer"] > 0  # the weaver wove
    # The choice's problems are not the block's: another data seed.
    choice_preds = rows(tmp / "out" / "kept-choice" / "predictions.jsonl")
    assert {p["id"] for p in choice_preds}.isdisjoint({p["id"] for p in preds})
    text = (tmp / "results.md").read_text()
    assert kept.MARKERS[0] in text and "| retrieval | off |" in text and "McNemar" in text
    # the block names the script that made it, with the arguments it was given
    assert block["command"].split(" --row ")[0].endswith("python benchmarks/quality_kept.py")
    assert f"--kept-artifact retrieval={store}" in block["command"]


def test_the_table_runs_the_block_on_its_rows(kept, artifacts, monkeypatch, capsys):
    quality = load("quality")
    weaver, tmp = artifacts["weaver"], artifacts["tmp"]
    table = [
        {"row": "vanilla", "artifact": str(weaver), "mode": "off"},
        {"row": "weaver-sft", "artifact": str(weaver), "mode": "weaver", "train_s": 1.0},
    ]
    monkeypatch.setattr(quality, "table", lambda args, cfg, out, quiet: {"table": table})
    quality.main(
        ["--table", "--kept", "--kept-tasks", "gym:syllogism", "--kept-n", "2",
         "--max-new-tokens", "2", "--output", str(tmp / "table")]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert [r["row"] for r in result["kept"]["rows"]] == ["vanilla", "weaver-sft"]
    assert result["kept"]["choice"] == {"by": "given", "tasks": ["gym:syllogism"]}
    assert not (tmp / "table" / "kept-choice").exists()  # given: nothing measured to choose


def test_a_block_without_memory_off_or_a_passing_task_says_why(kept, artifacts):
    with pytest.raises(MemgenError, match="needs the vanilla row"):
        kept.reference(
            [{"row": "retrieval", "artifact": str(artifacts["retrieval"]), "mode": "off"}]
        )
    argv = [
        "--row", f"vanilla={artifacts['weaver']}:off", "--kept-candidates", TASKS,
        "--kept-threshold", "1", "--kept-select-n", "2", "--max-new-tokens", "2",
        "--output", artifacts["tmp"] / "none",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="no candidate task reaches 100% with memory off"):
        kept.main([str(a) for a in argv])


def test_the_tables_retrieval_row_is_scored_on_the_same_problems(artifacts):
    """``quality.py --table --retrieval DIR``: one more artifact in each task's eval, its row
    built from that eval (memory off, build seconds as training, no trainable parameters)."""
    quality = load("quality")
    store, weaver = artifacts["retrieval"], artifacts["weaver"]
    metrics = {
        "results": [
            {"artifact": str(weaver), "mode": "off", "accuracy": 0.25, "stderr": 0.1, "n": 8,
             "mean_insertions": 0.0, "mean_tokens": 4.0, "samples_per_s": 3.0},
            {"artifact": str(store), "mode": "off", "accuracy": 0.5, "stderr": 0.1, "n": 8,
             "mean_insertions": 0.0, "mean_tokens": 4.0, "samples_per_s": 2.0,
             "vs_first": {"diff": 0.25, "diff_stderr": 0.1, "mcnemar_p": 0.5}},
        ]
    }  # fmt: skip
    row = quality.retrieval_row(store, [("gym:basic_arithmetic", metrics)])
    manifest = json.loads((store / "memgen.json").read_text())
    k, similarity = manifest["retrieval"]["k"], manifest["retrieval"]["similarity"]
    assert row["row"] == f"retrieval ({similarity}, k {k})"
    assert row["trainable_params"] == 0 and row["mode"] == "off"
    built = manifest["training"]["store_s"] + manifest["training"]["index_s"]
    assert row["train_s_total"] == round(built, 1)
    assert row["gym:basic_arithmetic"]["accuracy"] == 50.0
    assert row["gym:basic_arithmetic"]["vs_vanilla"]["diff"] == 0.25
    with pytest.raises(SystemExit, match="not a retrieval artifact"):
        quality.retrieval_row(weaver, [("gym:basic_arithmetic", metrics)])


def test_the_sweep_chooses_the_best_then_the_smaller_k_then_embed():
    sweep = load("retrieval_sweep")
    assert doctest.testmod(sweep).failed == 0
    rows = [
        {"similarity": "bm25", "k": 1, "accuracy": 0.40},
        {"similarity": "embed", "k": 4, "accuracy": 0.45},
        {"similarity": "bm25", "k": 2, "accuracy": 0.45},
    ]
    assert sweep.choose(rows) == {"similarity": "bm25", "k": 2, "accuracy": 0.45}
    assert sweep.choose(rows[:1] + [{**rows[0], "similarity": "embed"}])["similarity"] == "embed"
