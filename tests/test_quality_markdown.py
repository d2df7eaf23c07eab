"""benchmarks/quality.py --markdown: the --table result written into a marked block of a file.

A hand-built table (no model, no training): the block is appended where the file has none,
replaced on a later write, and nothing outside it changes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(
    acc: float, se: float, ins: float = 0.0, diff: float | None = None, per_s: float = 5.0
) -> dict:
    vs = None if diff is None else {"diff": diff, "diff_stderr": 0.021, "mcnemar_p": 1e-9}
    return {
        "accuracy": acc,
        "stderr": se,
        "n": 400,
        "insertions_per_answer": ins,
        "samples_per_s": per_s,
        "vs_vanilla": vs,
    }


def result(weaver_acc: float = 30.8, commit: str = "abc1234") -> dict:
    """What ``table()`` returns, for two rows and two tasks."""
    own, cross = "gym:basic_arithmetic", "gym:chain_sum"
    return {
        "table": [
            {"row": "vanilla", own: cell(18.0, 1.9), cross: cell(11.5, 2.3)},
            {
                "row": "lora-sft",
                "train_s_total": 439.0,
                "trainable_params": 1612800,
                own: cell(57.5, 2.5, diff=0.395),
                cross: cell(47.5, 3.5, diff=0.36),
            },
            {
                "row": "weaver-sft",
                "train_s_total": 359.4,
                "trainable_params": 1597826,
                own: cell(weaver_acc, 2.3, ins=2.32, diff=0.128, per_s=2.125),
                cross: cell(29.5, 3.2, diff=0.18),
            },
        ],
        "tasks": {
            own: {"n": 400, "options": ['config={"min_terms": 2}'], "seed": [1000000]},
            cross: {"n": 200, "options": [], "seed": [1000000]},
        },
        "seeds": {"train": 42},
        "lora_rank": 28,
        "measured": {
            "commit": commit,
            "date": "2026-12-04",
            "machine": "Linux-x86_64, 2 cores",
            "torch": "2.13.0+cpu",
        },
        "command": "OMP_NUM_THREADS=2 python benchmarks/quality.py --table --reuse",
        "recipe": "recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml",
        "family": "recipes/smollm2-135m/basic_arithmetic",
        "overrides": {"sft": [], "grpo": [], "lora-grpo": [], "trigger": []},
        "eval_seconds": {own: 697.2, cross: 388.1},
        "omp_num_threads": "2",
    }


BEFORE = "# Results\n\nSome text a person wrote.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
AFTER = "\n## History\n\nOlder runs, by hand.\n"


def test_table_rows_and_settings(quality):
    md = quality.markdown_table(result())
    lines = md.splitlines()
    assert lines[0] == (
        "| row | basic_arithmetic (n 400) | vs vanilla | insertions per answer | answers/s "
        "| chain_sum (n 200) | training s (chain) | trainable params |"
    )
    assert lines[2] == (
        "| vanilla (memory off) | 18.0 ± 1.9 % | – | 0 | 5.00 | 11.5 ± 2.3 % | – | – |"
    )
    assert lines[3] == (
        "| LoRA-SFT (r 28, TRL) | 57.5 ± 2.5 % | +39.5 ± 2.1 | 0 | 5.00 | 47.5 ± 3.5 % | 439 "
        "| 1,612,800 |"
    )
    assert lines[4] == (
        "| weaver-SFT | 30.8 ± 2.3 % | +12.8 ± 2.1 | 2.32 | 2.12 | 29.5 ± 3.2 % | 359 | 1,597,826 |"
    )
    retrieval = {
        "row": "retrieval (embed, k 2)",
        "train_s_total": 3.4,
        "trainable_params": 0,
        "gym:basic_arithmetic": cell(30.0, 2.3, diff=0.12, per_s=4.0),
        "gym:chain_sum": cell(20.0, 2.8, diff=0.085),
    }
    md2 = quality.markdown_table({**result(), "table": [*result()["table"], retrieval]})
    assert md2.splitlines()[5] == (
        "| retrieval (embed, k 2) | 30.0 ± 2.3 % | +12.0 ± 2.1 | 0 | 4.00 | 20.0 ± 2.8 % | 3 | 0 |"
    )
    for fact in ("2026-12-04", "`abc1234`", "2 cores", "torch 2.13.0+cpu", "seed 42"):
        assert fact in md
    assert "quality.py --table --reuse" in md and "data seed 1000000" in md
    assert "recipes/smollm2-135m/basic_arithmetic/sft-weaver.yaml" in md


def test_block_appended_then_replaced_rest_untouched(quality, tmp_path):
    path = tmp_path / "results.md"
    path.write_text(BEFORE)
    quality.write_markdown(path, result())
    text = path.read_text()
    assert text.startswith(BEFORE)
    assert text.count(quality.BEGIN) == 1 and text.count(quality.END) == 1
    assert text.endswith(quality.END + "\n")
    assert "30.8 ± 2.3 %" in text

    path.write_text(text + AFTER)  # a person adds a section below the block
    quality.write_markdown(path, result(weaver_acc=34.5, commit="def5678"))
    again = path.read_text()
    assert again.count(quality.BEGIN) == 1 and again.count(quality.END) == 1
    assert "34.5 ± 2.3 %" in again and "`def5678`" in again
    assert "30.8 ± 2.3 %" not in again and "abc1234" not in again
    assert again.startswith(BEFORE)
    assert again.endswith(quality.END + "\n" + AFTER)
    assert again[: again.index(quality.BEGIN)] == text[: text.index(quality.BEGIN)]


def test_same_result_twice_changes_nothing(quality, tmp_path):
    path = tmp_path / "README.md"
    path.write_text(BEFORE + AFTER)
    quality.write_markdown(path, result())
    once = path.read_bytes()
    quality.write_markdown(path, result())
    assert path.read_bytes() == once


def test_crlf_outside_the_block_is_kept(quality, tmp_path):
    path = tmp_path / "notes.md"
    path.write_bytes(b"line one\r\nline two\r\n")
    quality.write_markdown(path, result())
    assert path.read_bytes().startswith(b"line one\r\nline two\r\n")


def test_missing_file_is_created(quality, tmp_path):
    path = tmp_path / "new.md"
    quality.write_markdown(path, result())
    text = path.read_text()
    assert text.startswith(quality.BEGIN) and text.endswith(quality.END + "\n")
    assert not (tmp_path / "new.md.tmp").exists()


def test_begin_without_end_is_refused_and_file_kept(quality, tmp_path):
    path = tmp_path / "broken.md"
    broken = BEFORE + quality.BEGIN + "\nhalf a table\n" + AFTER
    path.write_text(broken)
    with pytest.raises(SystemExit, match="without"):
        quality.write_markdown(path, result())
    assert path.read_text() == broken


def test_markdown_needs_table(quality, capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--markdown", "docs/results.md"])
    assert "--table" in capsys.readouterr().err
    args = quality.parse_args(["--table", "--markdown", "a.md", "--markdown", "b.md"])
    assert args.markdown == ["a.md", "b.md"]


def test_provenance_names_commit_date_machine_torch(quality):
    m = quality.provenance()
    assert set(m) == {"commit", "date", "machine", "torch"}
    assert "cores" in m["machine"] and m["torch"]


def kept_block() -> dict:
    """What ``quality_kept.run`` returns, for one row and one task."""
    c = {"accuracy": 12.0, "stderr": 3.3, "vs_off": None}
    return {
        "tasks": {"gym:letter_counting": {"n": 100}},
        "rows": [{"row": "vanilla", "mode": "off", "gym:letter_counting": c}],
        "reference": "vanilla",
        "choice": {"by": "given"},
    }


def test_kept_block_goes_where_its_markers_are_or_into_a_new_file_never_below_a_placed_table(
    quality, tmp_path
):
    kept_begin, kept_end = quality.quality_kept.MARKERS
    both = {**result(), "kept": kept_block()}
    # The README: the table placed by hand in the middle, no kept markers.
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + quality.BEGIN + "\nold\n" + quality.END + "\n" + AFTER)
    # docs/results.md: both blocks placed.
    results = tmp_path / "results.md"
    results.write_text(
        BEFORE
        + f"{quality.BEGIN}\n{quality.END}\n\nReading it.\n\n{kept_begin}\n{kept_end}\n"
        + AFTER
    )
    fresh = tmp_path / "new.md"
    said = []
    quality.write_blocks([str(readme), str(results), str(fresh)], both, True, said.append)

    text = readme.read_text()
    assert kept_begin not in text and "letter_counting" not in text
    assert text.endswith(quality.END + "\n" + AFTER) and "30.8 ± 2.3 %" in text
    assert len(said) == 1 and said[0].startswith(f"{readme}: has the table's block but no ")
    assert kept_begin in said[0]

    text = results.read_text()
    assert text.count(kept_begin) == 1 and "| vanilla | off | 12.0 ± 3.3 % |" in text
    assert text.index(quality.END) < text.index("Reading it.") < text.index(kept_begin)
    assert text.endswith(kept_end + "\n" + AFTER) and "30.8 ± 2.3 %" in text

    text = fresh.read_text()
    assert text.index(quality.BEGIN) < text.index(quality.END) < text.index(kept_begin)
    assert "| vanilla | off | 12.0 ± 3.3 % |" in text

    # Without --kept nothing of the kept block is written, and nothing said.
    plain = tmp_path / "plain.md"
    quality.write_blocks([str(plain)], result(), False, said.append)
    assert kept_begin not in plain.read_text() and len(said) == 1
