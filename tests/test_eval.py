"""`memgen eval`: modes side by side on the same problems, outputs, held-out seeds, bad input,
and a two-process run that reproduces the single-process one exactly."""

from __future__ import annotations

import doctest
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from helpers import tiny_artifact, torchrun, write_jsonl
from memgen_cli import distributed
from memgen_cli.cli import app
from memgen_cli.data import get_task
from memgen_cli.data.graders import extract_final_answer
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation import heldout, plan, report, stats
from memgen_cli.stages import evaluate as ev

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    f"Sam has {i} apples and buys {i + 3} more, then eats one. How many are left?" for i in range(7)
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_weaver, tmp_path_factory):
    """(base_dir, artifact_dir, gsm8k-format file) shared by the tests of this module."""
    return (*tiny_weaver, write_gsm8k(tmp_path_factory.mktemp("eval") / "gsm.jsonl", QUESTIONS))


def write_gsm8k(path: Path, questions: list[str]) -> Path:
    rows = [{"question": q, "answer": f"Work.\n#### {2 * i + 2}"} for i, q in enumerate(questions)]
    return write_jsonl(path, rows)


def invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)], catch_exceptions=False)


def eval_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- parsing
def test_specs_split_on_commas_keep_order_and_drop_repeats():
    assert ev.parse_specs(["gsm8k,gym:chain_sum", "gsm8k", " math "]) == [
        "gsm8k",
        "gym:chain_sum",
        "math",
    ]
    with pytest.raises(MemgenError, match="at least one task"):
        ev.parse_specs([" , "])


def test_default_modes_follow_the_artifact():
    quiet = Console(file=open(os.devnull, "w"))
    weaver = {"trigger": {"trained": False}}
    memgen = {"trigger": {"trained": True}}
    assert plan.parse_modes(None, None, quiet) == ["off"]
    assert plan.parse_modes(None, weaver, quiet) == ["off", "weaver"]
    assert plan.parse_modes(None, memgen, quiet) == ["off", "weaver", "full"]
    assert plan.parse_modes("weaver, off,weaver", weaver, quiet) == ["weaver", "off"]
    assert plan.parse_modes("off", None, quiet) == ["off"]


@pytest.mark.parametrize(
    "memory,manifest,message",
    [
        (
            "off,wever",
            {"trigger": {"trained": False}},
            'unknown memory mode "wever".*Did you mean "weaver"',
        ),
        ("off,weaver", None, "--memory weaver needs a trained weaver: pass --artifact"),
        ("full", {"trigger": {"trained": False}}, "needs a trained trigger"),
        (",", None, "at least one of"),
    ],
)
def test_bad_memory_modes(memory, manifest, message):
    with pytest.raises(MemgenError, match=message):
        plan.parse_modes(memory, manifest, Console(file=open(os.devnull, "w")))


def test_task_options_come_from_the_artifact_for_its_own_task_only():
    quiet = Console(file=open(os.devnull, "w"))
    recorded = {"config": {"min_terms": 3}}
    manifests = [{"training": {"task": "gym:basic_arithmetic", "task_options": recorded}}]
    assert ev.task_options("gym:basic_arithmetic", {}, manifests, quiet) == recorded
    assert ev.task_options("gym:chain_sum", {}, manifests, quiet) == {}  # another task
    given = {"config": {"min_terms": 2}}  # what the user asks for wins
    assert ev.task_options("gym:basic_arithmetic", given, manifests, quiet) == given
    assert ev.task_options("gym:basic_arithmetic", {}, [{"training": {}}], quiet) == {}


def test_a_task_option_given_replaces_only_its_own_key_of_the_recorded_ones():
    out = io.StringIO()
    notes = Console(file=out, width=200)
    recorded = {"level": 105, "objective": "brief", "max_turns": 12, "shots": 2}
    manifests = [{"training": {"task": "textworld:coin_collector", "task_options": recorded}}]
    got = ev.task_options("textworld:coin_collector", {"level": 110}, manifests, notes)
    assert got == {"level": 110, "objective": "brief", "max_turns": 12, "shots": 2}
    assert recorded["level"] == 105  # the manifest's own record is left as it was
    assert "(from the artifact: objective, max_turns, shots)" in out.getvalue()
    # another task, or no recorded options: only what was given
    assert ev.task_options("textworld:treasure_hunter", {"level": 3}, manifests, notes) == {
        "level": 3
    }


def test_task_options_nest_and_read_yaml_values():
    got = ev.parse_task_options(
        [
            "grader=numeric",
            "columns.prompt=problem",
            "columns.answer=label",
            "size=50",
            "config={min_terms: 2}",
        ]
    )
    assert got == {
        "grader": "numeric",
        "columns": {"prompt": "problem", "answer": "label"},
        "size": 50,
        "config": {"min_terms": 2},
    }
    with pytest.raises(MemgenError, match="key=value"):
        ev.parse_task_options(["grader"])


# --------------------------------------------------------------------------- held-out seeds
def _notes():
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    return console, lambda: console.export_text()


def test_gym_eval_seed_is_held_out_from_the_recorded_training_range():
    task = get_task("gsm_symbolic")
    console, text = _notes()
    assert ev.data_seed(task, None, 10, None, console) == task.eval_seed  # nothing recorded
    # Drew generator seeds [999_990, 1_000_040): the default eval seed lies inside.
    summary = {"task": "gsm_symbolic", "data_seed": 999_990, "samples": 40, "heldout_samples": 8}
    manifest = {"training": {**summary, "dropped_too_long": 2}}  # as sft-weaver records it
    task = get_task("gsm_symbolic")
    assert ev.data_seed(task, None, 10, manifest, console) == 1_000_040
    assert task.train_seed == 999_990  # the duplicate filter now reads the real train set
    assert "eval seed moved to 1000040" in text()
    assert ev.data_seed(get_task("gym:chain_sum"), None, 10, manifest, console) == 1_000_000
    # Recorded elsewhere: the default is kept; a user seed inside the range is kept with a warning.
    far = {"training": {"task": "gsm_symbolic", "data_seed": 42, "samples": 5000}}
    assert ev.data_seed(get_task("gsm_symbolic"), None, 10, far, console) == 1_000_000
    assert ev.data_seed(get_task("gsm_symbolic"), 100, 10, far, console) == 100
    assert "--seed 100 draws gsm_symbolic problems from the same generator range" in text()


def test_fixed_datasets_take_the_seed_as_a_shuffle_seed(tiny):
    task = get_task(str(tiny[2]))
    assert ev.data_seed(task, None, 3, {"training": {"seed": 5}}, Console()) is None
    assert ev.data_seed(task, 7, 3, None, Console()) == 7


# --------------------------------------------------------------------------- metrics
def test_summary_statistics():
    recs = [
        {"score": s, "num_tokens": t, "finished": f, "insertions": ins}
        for s, t, f, ins in [
            (1.0, 10, True, [{"kind": "prompt"}, {"kind": "inference"}]),
            (0.0, 20, False, [{"kind": "prompt"}]),
            (1.0, 30, True, [{"kind": "prompt"}, {"kind": "inference"}, {"kind": "inference"}]),
            (1.0, 40, True, [{"kind": "prompt"}]),
        ]
    ]
    task = get_task("gsm_symbolic")
    got = ev.summarize("t", task, "weaver", recs, seconds=2.0, grade_s=0.1)
    assert got["accuracy"] == 0.75 and got["n"] == 4
    assert got["stderr"] == pytest.approx(0.25)  # sample sd 0.5 / sqrt(4)
    assert got["mean_insertions"] == 1.75 and got["mean_inference_insertions"] == 0.75
    assert got["samples_per_s"] == 2.0 and got["tokens_per_s"] == 50.0 and got["finished"] == 0.75


# --------------------------------------------------------------------------- end to end
def test_off_and_weaver_on_the_same_problems(tiny, tmp_path):
    base, art, data = tiny
    out = tmp_path / "out"
    got = eval_json(
        "--artifact",
        art,
        "--data",
        data,
        "--limit",
        5,
        "--max-new-tokens",
        10,
        "--batch-size",
        2,
        "--output",
        out,
    )
    results = {r["mode"]: r for r in got["results"]}
    assert list(results) == ["off", "weaver"]  # the default with an untriggered artifact
    for r in got["results"]:
        assert {
            "task",
            "mode",
            "accuracy",
            "n",
            "mean_insertions",
            "samples_per_s",
            "tokens_per_s",
        } <= set(r)
        assert r["task"] == str(data) and r["n"] == 5 and 0.0 <= r["accuracy"] <= 1.0
    assert results["off"]["mean_insertions"] == 0 and results["weaver"]["mean_insertions"] >= 1
    assert sorted(p.name for p in out.iterdir()) == [
        "memgen-output.json",  # the marker that lets --overwrite recognise an eval output
        "metrics.json",
        "predictions.jsonl",
    ]
    assert json.loads((out / "metrics.json").read_text())["results"] == got["results"]
    preds = read_predictions(out)
    by_mode = {m: [p for p in preds if p["mode"] == m] for m in ("off", "weaver")}
    assert (
        [p["id"] for p in by_mode["off"]]
        == [p["id"] for p in by_mode["weaver"]]
        == [f"gsm8k/test/{i}" for i in range(5)]
    )
    task = get_task(str(data))
    for p in preds:
        assert p["prompt"] == f"{QUESTIONS[p['index']]}\nAnswer briefly."  # the artifact's suffix
        assert p["extracted"] == task.extract(p["completion"])
        assert p["score"] == task.grade(p["completion"], task.load(limit=5)[p["index"]])
        assert p["gold"] == str(2 * p["index"] + 2) and p["num_tokens"] <= 10
        positions = [i["token_index"] for i in p["insertions"]]
        assert all(0 <= pos <= p["num_tokens"] for pos in positions)
    assert all(p["insertions"] == [] for p in by_mode["off"])
    assert all(
        p["insertions"][0] == {**p["insertions"][0], "kind": "prompt", "token_index": 0}
        for p in by_mode["weaver"]
    )
    for mode, r in results.items():
        assert r["accuracy"] == sum(p["score"] for p in by_mode[mode]) / 5


def test_accuracy_counts_what_the_grader_accepts(tiny, tmp_path):
    """Gold answers copied from a first run: the second (greedy) run scores exactly those."""
    base, _, _ = tiny
    rows = [{"question": q, "answer": "never-said"} for q in QUESTIONS]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = (
        "--base",
        base,
        "--data",
        "jsonl",
        "--task-option",
        f"path={data}",
        "--task-option",
        "grader=exact",
        "--max-new-tokens",
        8,
    )
    first = eval_json(*opts, "--output", tmp_path / "a")
    assert first["results"][0]["accuracy"] == 0.0
    answers = [extract_final_answer(p["completion"]) for p in read_predictions(tmp_path / "a")]
    hits = [i for i, a in enumerate(answers) if a and i % 2 == 0]
    assert hits, answers
    for i in hits:
        rows[i]["answer"] = answers[i]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = eval_json(*opts, "--output", tmp_path / "b")
    assert second["results"][0]["accuracy"] == pytest.approx(len(hits) / len(rows))
    assert [p["correct"] for p in read_predictions(tmp_path / "b")] == [
        i in hits for i in range(len(rows))
    ]


def test_without_artifact_only_off_and_it_says_so(tiny, tmp_path):
    base, _, data = tiny
    result = invoke(
        *("--base", base, "--data", data, "--limit", 2),
        *("--max-new-tokens", 4, "--output", tmp_path / "o"),
    )
    assert result.exit_code == 0, result.output
    assert "only memory off (the plain reasoner) is evaluated" in result.stderr
    assert (
        "memgen eval" in result.stdout
        and " off " in result.stdout
        and "weaver" not in result.stdout
    )


def test_prompt_suffix_override_is_used_and_warned_about(tiny, tmp_path):
    _, art, data = tiny
    result = invoke(
        *("--artifact", art, "--data", data, "--limit", 2, "--memory", "off"),
        *("--max-new-tokens", 4, "--prompt-suffix", "Box it."),
        *("--output", tmp_path / "o", "--json"),
    )
    assert result.exit_code == 0, result.output
    assert "differs from the artifact's training format" in result.stderr
    assert all(p["prompt"].endswith("\nBox it.") for p in read_predictions(tmp_path / "o"))


# --------------------------------------------------------------------------- contamination
def _with_training(src: Path, dst: Path, **training) -> Path:
    """A copy of artifact ``src`` whose manifest records other training data."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "memgen.json").read_text())
    manifest["training"] = training
    (dst / "memgen.json").write_text(json.dumps(manifest))
    return dst


def test_gsm8k_test_is_recognised_by_split_and_file_name(tmp_path):
    (tmp_path / "gsm").mkdir()
    for name in ("test.jsonl", "train.jsonl", "gsm8k_test.jsonl"):
        write_gsm8k(tmp_path / "gsm" / name, QUESTIONS[:1])
    assert heldout.is_gsm8k_test(get_task("gsm8k"), None)  # the hub's default split is test
    assert heldout.is_gsm8k_test(get_task("gsm8k"), "test")
    assert not heldout.is_gsm8k_test(get_task("gsm8k"), "train")
    assert heldout.is_gsm8k_test(get_task(str(tmp_path / "gsm")), None)  # directory: test.jsonl
    assert not heldout.is_gsm8k_test(get_task(str(tmp_path / "gsm")), "train")
    assert heldout.is_gsm8k_test(get_task(str(tmp_path / "gsm" / "gsm8k_test.jsonl")), None)
    assert not heldout.is_gsm8k_test(get_task(str(tmp_path / "gsm" / "train.jsonl")), None)
    assert not heldout.is_gsm8k_test(get_task("gsm_symbolic"), None)
    assert not heldout.is_gsm8k_test(get_task("gym:chain_sum"), "test")


def test_contamination_warning_names_the_overlap_only_when_there_is_one(tmp_path):
    gsm_test, chain = get_task("gsm8k"), get_task("gym:chain_sum")
    symbolic = {"training": {"task": "gsm_symbolic"}}
    (got,) = ev.contamination_warnings(symbolic, "runs/a", {"gsm8k": gsm_test}, None)
    assert "runs/a was trained on gsm_symbolic" in got and "GSM8K test" in got
    assert ev.contamination_warnings(symbolic, "a", {"gsm8k": gsm_test}, "train") == []
    assert ev.contamination_warnings(symbolic, "a", {"gym:chain_sum": chain}, None) == []
    for other in ("gsm8k", "gym:chain_sum", "test"):
        manifest = {"training": {"task": other}}
        assert ev.contamination_warnings(manifest, "a", {"gsm8k": gsm_test}, None) == []
    assert ev.contamination_warnings(None, None, {"gsm8k": gsm_test}, None) == []
    # An artifact trained further from a gsm_symbolic parent inherits the overlap.
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "memgen.json").write_text(json.dumps(symbolic))
    child = {"training": {"task": "gym:chain_sum"}, "parent": {"name": str(parent)}}
    assert heldout.trained_tasks(child) == ["gym:chain_sum", "gsm_symbolic"]
    assert len(ev.contamination_warnings(child, "c", {"gsm8k": gsm_test}, None)) == 1


def test_eval_warns_about_gsm_symbolic_training_on_gsm8k_test(tiny, tmp_path):
    _, art, _ = tiny
    symbolic = _with_training(art, tmp_path / "symbolic", task="gsm_symbolic", data_seed=42)
    test_file = write_gsm8k(tmp_path / "test.jsonl", QUESTIONS[:2])
    train_file = write_gsm8k(tmp_path / "train.jsonl", QUESTIONS[:2])
    common = ("--memory", "off", "--max-new-tokens", 2, "--json")
    result = invoke(
        "--artifact", symbolic, "--data", test_file, *common, "--output", tmp_path / "a"
    )
    assert result.exit_code == 0, result.output
    (warning,) = json.loads(result.stdout)["warnings"]
    assert "trained on gsm_symbolic" in warning and "test.jsonl (GSM8K test)" in warning
    assert "trained on gsm_symbolic" in " ".join(result.stderr.split())
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["warnings"] == [warning]
    table = invoke(
        "--artifact", symbolic, "--data", test_file, *common[:-1], "--output", tmp_path / "t"
    )
    assert "contaminated" in " ".join(table.stdout.split())  # also under the table
    for artifact, data in ((symbolic, train_file), (art, test_file)):
        out = ("--output", tmp_path / "b", "--overwrite")  # the second replaces the first
        result = invoke("--artifact", artifact, "--data", data, *common, *out)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["warnings"] == [] and "warning" not in result.stderr


# --------------------------------------------------------------------------- several artifacts
@pytest.mark.parametrize("module", [stats, report])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_mcnemar_and_paired_difference_against_hand_computed_values():
    # n = 5 discordant, 1 vs 4: 2 * (C(5,0) + C(5,1)) / 2^5 = 12/32
    assert stats.mcnemar_p(1, 4) == stats.mcnemar_p(4, 1) == 0.375
    assert stats.mcnemar_p(0, 5) == 2 / 32
    assert stats.mcnemar_p(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert stats.mcnemar_p(3, 3) == 1.0 and stats.mcnemar_p(0, 0) == 1.0
    assert 0.02 < stats.mcnemar_p(950, 1050) < 0.03  # exact integers: no overflow on large n
    ref = [True, True, False, False, True, False]
    other = [True, False, True, True, True, False]
    got = stats.paired(ref, other)
    # differences 0, -1, +1, +1, 0, 0: mean 1/6; squared deviations 3 × (1/6)², (7/6)², 2 × (5/6)²
    assert got["diff"] == pytest.approx(1 / 6)
    assert got["diff_stderr"] == pytest.approx(math.sqrt((3 / 36 + 49 / 36 + 50 / 36) / 5 / 6))
    assert (got["reference_only"], got["row_only"]) == (1, 2)
    assert got["mcnemar_p"] == 1.0  # 2 * (C(3,0) + C(3,1)) / 8 = 1


def test_artifact_lists_split_on_commas_and_drop_repeats():
    got = ev.artifact_paths([Path("a"), "b,c", "a"])
    assert got == [Path("a"), Path("b"), Path("c")]
    assert ev.artifact_paths(None) == [] and ev.artifact_paths(Path("x")) == [Path("x")]


@pytest.fixture(scope="module")
def more(tiny, tmp_path_factory):
    """A second weaver artifact (another directory; seeded alike, so the same tensors) and a LoRA
    baseline."""
    from memgen_cli.stages import baseline

    tmp = tmp_path_factory.mktemp("more")
    _, second = tiny_artifact(tmp)
    cfg = baseline.resolve_config(
        ROOT / "recipes" / "tiny" / "baseline-sft.yaml",
        ["training.learning_rate=0.05", "training.max_steps=4", "data.heldout=0"],
        base=str(tiny[0]),
        data=str(tiny[2]),
        output=tmp / "baseline",
    )
    return second, baseline.run(cfg, console=Console(file=open(os.devnull, "w")))


def test_two_artifacts_two_modes_one_row_per_pair_on_the_same_problems(tiny, more, tmp_path):
    base, first, data = tiny
    second, _ = more
    got = eval_json(
        "--artifact", first, "--artifact", second, "--data", data, "--memory", "off,weaver",
        "--limit", 5, "--max-new-tokens", 8, "--batch-size", 2, "--output", tmp_path,
    )  # fmt: skip
    keys = [(r["task"], r["artifact"], r["mode"]) for r in got["results"]]
    assert keys == [(str(data), str(a), m) for a in (first, second) for m in ("off", "weaver")]
    preds = read_predictions(tmp_path)
    ids = {}
    for p in preds:
        ids.setdefault((p["task"], p["artifact"], p["mode"]), []).append(p["id"])
    assert list(ids) == keys
    assert all(v == [f"gsm8k/test/{i}" for i in range(5)] for v in ids.values())
    assert [a["path"] for a in got["config"]["artifacts"]] == [str(first), str(second)]
    rows = got["results"]
    assert rows[0]["vs_first"] is None
    by = {
        k: [p["correct"] for p in preds if (p["task"], p["artifact"], p["mode"]) == k] for k in keys
    }
    for key, row in zip(keys[1:], rows[1:], strict=True):
        expected = stats.paired(by[keys[0]], by[key])
        assert row["vs_first"] == {"artifact": str(first), "mode": "off", **expected}
        assert row["accuracy"] == sum(by[key]) / 5
    # Memory off is the plain reasoner whichever weaver is loaded: it runs once and the
    # second artifact's row reuses it; a run of the second artifact alone gives the same.
    off = [
        [p["completion"] for p in preds if p["mode"] == "off" and p["artifact"] == str(a)]
        for a in (first, second)
    ]
    assert off[0] == off[1]
    alone = eval_json(
        "--artifact", second, "--data", data, "--memory", "off", "--limit", 5,
        "--max-new-tokens", 8, "--batch-size", 2, "--output", tmp_path / "alone",
    )  # fmt: skip
    assert [p["completion"] for p in read_predictions(tmp_path / "alone")] == off[1]
    assert alone["results"][0]["accuracy"] == rows[2]["accuracy"]
    assert rows[2]["reused_from"] == str(first) and "reused_from" not in rows[0]
    args = [
        "eval",
        "--artifact",
        f"{first},{second}",
        "--data",
        str(data),
        "--memory",
        "off,weaver",
    ]
    args += ["--limit", "5", "--max-new-tokens", "8", "--output", str(tmp_path / "t")]
    table = runner.invoke(app, args, env={"COLUMNS": "200"}).stdout
    assert "artifact" in table and "Δ vs first" in table and "McNemar" in table
    names = report.short_labels([str(first), str(second)])
    assert names[str(first)] != names[str(second)]  # both end in artifact-llama
    assert all(name in table for name in names.values())


def test_a_baseline_runs_as_the_adapted_reasoner_with_memory_off(tiny, more, tmp_path):
    from memgen_cli.artifacts import load_baseline
    from memgen_cli.generation import encode_prompts

    _, weaver, data = tiny
    _, baseline = more
    got = eval_json(
        "--artifact", weaver, "--artifact", baseline, "--data", data, "--limit", 4,
        "--max-new-tokens", 8, "--output", tmp_path,
    )  # fmt: skip
    keys = [(r["artifact"], r["mode"]) for r in got["results"]]
    assert keys == [(str(weaver), "off"), (str(weaver), "weaver"), (str(baseline), "off")]
    assert got["config"]["artifacts"][1]["kind"] == "baseline"
    preds = [p for p in read_predictions(tmp_path) if p["artifact"] == str(baseline)]
    # The same tokens as the PEFT model itself, greedy.
    model, _, loaded = load_baseline(baseline, device="cpu")
    tok = loaded.tokenizer
    enc = encode_prompts(tok, [[{"role": "user", "content": p["prompt"]}] for p in preds], "cpu")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    for row, p in enumerate(preds):
        ids = out[row, enc["input_ids"].shape[1] :].tolist()
        assert p["completion"] == tok.decode(ids, skip_special_tokens=True)
        assert p["insertions"] == []
    result = invoke(
        "--artifact", baseline, "--data", data, "--memory", "weaver", "--output", tmp_path / "x"
    )
    assert result.exit_code == 2 and "LoRA baselines have no memory" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- bad input
def _hub_error(message: str):
    def fail(*args, **kwargs):
        raise ConnectionError(message)

    return fail


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown_task", "unknown task 'gsm9k'. Known tasks: gsm8k, gsm_symbolic"),
        ("missing_artifact", "does not exist (expected a directory with memgen.json)"),
        ("not_an_artifact", "is not a memgen artifact: memgen.json is missing"),
        ("limit_zero", "--limit must be at least 1"),
        ("gated", "access to Idavidrein/gpqa is gated: accept its terms"),
        ("offline", "the Hugging Face hub could not be reached"),
        ("other_base", "This artifact was trained on base"),
        ("weaver_without_artifact", "needs a trained weaver: pass --artifact DIR"),
        ("full_without_trigger", "needs a trained trigger"),
    ],
)
def test_bad_input_one_clear_message_exit_2(
    case, message, tiny, tiny_qwen_base, tmp_path, monkeypatch
):
    base, art, data = tiny
    args = ["--data", data, "--base", base, "--max-new-tokens", 2]
    if case == "unknown_task":
        args[1] = "gsm9k"
    elif case == "missing_artifact":
        args += ["--artifact", tmp_path / "nope"]
    elif case == "not_an_artifact":
        args += ["--artifact", tmp_path]
    elif case == "limit_zero":
        args += ["--limit", 0]
    elif case in ("gated", "offline"):
        import datasets

        text = "Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be authenticated"
        monkeypatch.setattr(
            datasets, "load_dataset", _hub_error(text if case == "gated" else "offline")
        )
        args[1] = "gpqa" if case == "gated" else "gsm8k"
    elif case == "other_base":
        args[3] = tiny_qwen_base
        args += ["--artifact", art]
    elif case == "weaver_without_artifact":
        args += ["--memory", "off,weaver"]
    elif case == "full_without_trigger":
        args += ["--artifact", art, "--memory", "full"]
    result = invoke(*args, "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    if case == "unknown_task":
        assert 'Did you mean "gsm8k"' in result.output


# --------------------------------------------------------------------------- processes
def test_distributed_helpers_without_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.info() == distributed.DistInfo(0, 1, 0) and distributed.init().is_main
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}]
    assert distributed.device_for_rank("auto") == "auto"
    items = list(range(10))
    shares = [distributed.shard(items, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.info() == distributed.DistInfo(1, 3, 1)
    assert distributed.shard(items) == [1, 4, 7]


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_results(tiny, tmp_path):
    _, art, data = tiny
    args = ["--artifact", art, "--data", data, "--max-new-tokens", 8, "--batch-size", 2]
    one = eval_json(*args, "--output", tmp_path / "one")  # this process, one thread
    double = torchrun(["eval", *args, "--json", "--output", tmp_path / "two"], cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    two = json.loads(double.stdout)  # one JSON object: rank 0 alone prints
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    keep = ("task", "mode", "accuracy", "n", "mean_insertions", "mean_tokens")
    assert [{k: r[k] for k in keep} for r in two["results"]] == [
        {k: r[k] for k in keep} for r in one["results"]
    ]
    fields = ("mode", "id", "completion", "extracted", "score", "insertions")
    a, b = read_predictions(tmp_path / "one"), read_predictions(tmp_path / "two")
    assert len(a) == 2 * len(QUESTIONS)
    assert [{k: p[k] for k in fields} for p in b] == [{k: p[k] for k in fields} for p in a]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "one") == [
        "two"
    ]  # one result set


@pytest.mark.slow
def test_embedded_model_off_mode_matches_plain_transformers_generate(tmp_path):
    """Memory off through the CLI gives the tokens of HF ``model.generate`` (greedy, same batch)."""
    from memgen_cli.generation import encode_prompts
    from memgen_cli.models.base import load_base

    questions = [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
        "What is 3 + 4?",
        "A baker makes 12 cakes a day. How many cakes does he make in 5 days?",
    ]
    data = write_gsm8k(tmp_path / "gsm.jsonl", questions)
    got = eval_json(
        "--data", data, "--max-new-tokens", 24, "--batch-size", 4, "--output", tmp_path / "o"
    )
    assert got["results"][0]["n"] == 4 and got["config"]["base"]["name"] == "smollm2-135m"
    preds = read_predictions(tmp_path / "o")
    base = load_base("smollm2-135m", device="cpu")
    tok = base.tokenizer
    messages = [[{"role": "user", "content": p["prompt"]}] for p in preds]
    # The eval batches longest prompt first; one batch here, so padding is the same for all.
    enc = encode_prompts(tok, messages, "cpu")
    with torch.no_grad():
        out = base.model.generate(
            **enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
        )
    for row, p in enumerate(preds):
        ids = out[row, enc["input_ids"].shape[1] :].tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        assert p["completion"] == text
        assert p["prompt"].endswith("Put your final answer within \\boxed{}.")


def test_full_runs_only_where_an_artifact_has_a_trained_trigger(tmp_path):
    quiet = Console(file=open(os.devnull, "w"))
    _, plain = tiny_artifact(tmp_path / "a")
    _, triggered = tiny_artifact(tmp_path / "b", trained_trigger=True)
    entries = ev.plan_entries([plain, triggered], "off,weaver,full", quiet)
    assert [(e.path, e.modes) for e in entries] == [
        (plain, ["off", "weaver"]),
        (triggered, ["off", "weaver", "full"]),
    ]
    entries = ev.plan_entries([plain, triggered], "full", quiet)
    assert [(e.path, e.modes) for e in entries] == [(triggered, ["full"])]
    with pytest.raises(MemgenError, match="needs a trained trigger"):
        ev.plan_entries([plain], "off,full", quiet)  # alone: asked for what it cannot do


def test_an_artifact_with_the_same_weaver_reuses_its_rows(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, first, data = tiny
    copy = shutil.copytree(first, tmp_path / "copy")  # e.g. a trigger artifact's weaver
    second = shutil.copytree(first, tmp_path / "second")  # the same but one weaver tensor
    tensors = load_file(second / "weaver.safetensors")
    tensors["queries.prompt"] = tensors["queries.prompt"] + 0.5
    save_file(tensors, second / "weaver.safetensors")
    got = eval_json(
        "--artifact", f"{first},{second},{copy}", "--data", data, "--memory", "off,weaver",
        "--limit", 4, "--max-new-tokens", 8, "--batch-size", 2, "--output", tmp_path / "e",
    )  # fmt: skip
    reused = [(r["artifact"], r["mode"], r.get("reused_from")) for r in got["results"]]
    assert reused == [
        (str(first), "off", None),
        (str(first), "weaver", None),
        (str(second), "off", str(first)),
        (str(second), "weaver", None),  # other weaver tensors: run
        (str(copy), "off", str(first)),
        (str(copy), "weaver", str(first)),
    ]
    preds = read_predictions(tmp_path / "e")
    rows = {
        (a, m): [p["completion"] for p in preds if (p["artifact"], p["mode"]) == (a, m)]
        for a, m, _ in reused
    }
    assert rows[(str(copy), "weaver")] == rows[(str(first), "weaver")]


# --------------------------------------------------------------------------- the printed table
def scripted_grades(monkeypatch):
    """Grade by rule instead of by answer (tiny models never answer right): memory off solves
    every third problem, any other row every second, so the table has figures to print."""
    real = ev.prediction

    def prediction(task, label, mode, problem, *rest):
        record = real(task, label, mode, problem, *rest)
        hit = problem.index % (3 if mode == "off" else 2) == 0
        return {**record, "score": float(hit), "correct": hit}

    monkeypatch.setattr(ev, "prediction", prediction)


def test_a_log_gets_the_whole_table_at_any_width(tiny, tmp_path, monkeypatch):
    """Printed where stdout is no terminal (a log), no cell is cut to 80 columns with an ellipsis."""
    base, art, _ = tiny
    scripted_grades(monkeypatch)
    name = "held-out-sums-with-a-name-too-long-for-eighty-columns.jsonl"
    data = write_gsm8k(tmp_path / name, QUESTIONS)
    second = shutil.copytree(art, tmp_path / "a-second-weaver-with-a-long-directory-name")
    out = tmp_path / "out"
    args = ["eval", "--artifact", f"{art},{second}", "--data", str(data), "--memory", "off,weaver"]
    args += ["--max-new-tokens", "4", "--batch-size", "4", "--output", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "…" not in table and name in table and second.name in table
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["accuracy"] for r in rows] == [3 / 7, 4 / 7] * 2  # indices 0, 3, 6 | 0, 2, 4, 6
    for r in rows:
        assert f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}" in table
        if r["vs_first"] is not None:
            v = r["vs_first"]
            paired = f"{100 * v['diff']:+.1f}±{100 * v['diff_stderr']:.1f} p={v['mcnemar_p']:.2g}"
            assert paired in table, paired


def test_show_prints_the_first_problems_with_gold_and_each_rows_mark(tiny, tmp_path, monkeypatch):
    _, art, data = tiny
    scripted_grades(monkeypatch)
    args = ["eval", "--artifact", str(art), "--data", str(data), "--memory", "off,weaver"]
    args += ["--max-new-tokens", "4", "--show", "3", "--output", str(tmp_path / "o")]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = result.stdout.split("the first 3 problems of each task")[1]
    preds = {(p["mode"], p["index"]): p for p in read_predictions(tmp_path / "o")}
    # off solves every third problem, weaver every second: problems 0, 1, 2 read ✓✓, ✗✗, ✗✓.
    for index, marks in enumerate([["✓", "✓"], ["✗", "✗"], ["✗", "✓"]]):
        (line,) = [line for line in table.splitlines() if QUESTIONS[index] in line]
        cells = [cell.strip() for cell in line.split("│")[1:-1]]  # task # question gold off weaver
        assert cells[1:2] + cells[3:4] == [str(index), str(2 * index + 2)], line
        answers = [preds[(mode, index)]["extracted"] or "∅" for mode in ("off", "weaver")]
        assert cells[4:] == [
            f"{mark} {answer}" for mark, answer in zip(marks, answers, strict=True)
        ], line
    assert not any(q in table for q in QUESTIONS[3:])  # the first three only
    quiet = runner.invoke(app, [*args[:-2], "--output", str(tmp_path / "j"), "--json"])
    assert json.loads(quiet.stdout)["results"]  # --json stays one JSON object


def test_paired_figures_pair_each_problem_with_itself(tmp_path):
    """Hand-built predictions, rows listed in other orders: of 10 problems the reference row
    alone solves #3, the other row alone #4, #5 and #6, both #0-#2, neither #7-#9. Differences:
    six 0, one -1, three +1: mean 0.2; sample variance (6 × 0.2² + 1.2² + 3 × 0.8²) / 9 = 0.4,
    s.e. √(0.4 / 10) = 0.2; exact McNemar on 1 vs 3: 2 × (C(4,0) + C(4,1)) / 2⁴ = 0.625."""
    ref = {0, 1, 2, 3}
    other = {0, 1, 2, 4, 5, 6}

    def rows(artifact, mode, solved, order):
        return [
            {"task": "t", "artifact": artifact, "mode": mode, "index": i, "correct": i in solved}
            for i in order
        ]

    predictions = rows("a", "off", ref, range(10)) + rows("a", "weaver", other, range(9, -1, -1))
    predictions += rows("b", "off", ref, [5, 0, 8, 3, 1, 9, 2, 7, 4, 6])  # the same as the first
    results = [{"task": "t", "artifact": a, "mode": m} for a, m in (("a", "off"), ("a", "weaver"))]
    results.append({"task": "t", "artifact": "b", "mode": "off"})
    ev.add_paired(results, predictions)
    assert results[0]["vs_first"] is None
    got = results[1]["vs_first"]
    assert (got["artifact"], got["mode"]) == ("a", "off")
    assert (got["reference_only"], got["row_only"]) == (1, 3)
    assert got["diff"] == pytest.approx(0.2) and got["diff_stderr"] == pytest.approx(0.2)
    assert got["mcnemar_p"] == pytest.approx(0.625)
    same = results[2]["vs_first"]
    assert (same["diff"], same["diff_stderr"], same["mcnemar_p"]) == (0.0, 0.0, 1.0)
    assert (same["reference_only"], same["row_only"]) == (0, 0)
