"""A reasoning_gym scorer that raises is counted, reported and, past the tolerance, stops the run.

The task is real (``gym:spell_backward``: word answers, so its own scorer grades them); only
its scorer is made to raise, on chosen questions, by monkeypatching the dataset class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reasoning_gym.factory import DATASETS

from helpers import invoke
from memgen_cli.data import get_task
from memgen_cli.data.gym import MAX_GRADER_ERROR_RATE, MIN_GRADER_ERRORS, GraderErrors
from memgen_cli.errors import MemgenError
from memgen_cli.stages import grpo_weaver
from memgen_cli.training import rl

TASK = "spell_backward"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def break_scorer(monkeypatch, questions=None, times=None) -> None:
    """Make the task's own scorer raise for ``questions`` (None: all), at most ``times`` times."""
    dataset_cls = DATASETS[TASK][0]
    real = dataset_cls.score_answer
    left = [times]

    def score_answer(self, answer, entry):
        if (questions is None or entry["question"] in questions) and left[0] != 0:
            left[0] = None if left[0] is None else left[0] - 1
            raise KeyError("broken scorer")
        return real(self, answer, entry)

    monkeypatch.setattr(dataset_cls, "score_answer", score_answer)


# ------------------------------------------------------------------------------ the task
def test_grade_checked_returns_the_scorer_exception_and_grade_still_scores_zero(monkeypatch):
    task = get_task(f"gym:{TASK}")
    right, wrong = task.load("test", limit=2)
    break_scorer(monkeypatch, {wrong.question})
    assert task.grade_checked(f"<answer>{right.answer}</answer>", right) == (1.0, None)
    score, error = task.grade_checked(f"<answer>{wrong.answer}</answer>", wrong)
    assert score == 0.0 and error == f"{wrong.id}: KeyError: 'broken scorer'"
    assert task.grade(f"<answer>{wrong.answer}</answer>", wrong) == 0.0  # other callers: a 0


def test_tolerance_is_more_than_two_percent_and_at_least_three():
    assert (MAX_GRADER_ERROR_RATE, MIN_GRADER_ERRORS) == (0.02, 3)
    GraderErrors(10, ["a", "b"]).check("t")  # 20 %, but only 2
    GraderErrors(150, ["a", "b", "c"]).check("t")  # 3, but exactly 2 %
    with pytest.raises(MemgenError, match=r"grader of t raised on 3 of 100 answers.*first: a\."):
        GraderErrors(100, ["a", "b", "c"]).check("t")


# ------------------------------------------------------------------------------ eval
def run_eval(base: Path, out: Path, *extra, limit: int = 10):
    args = ["eval", "--base", base, "--data", f"gym:{TASK}", "--limit", limit]
    args += ["--max-new-tokens", 4, "--batch-size", 5, "--output", out, *extra]
    return invoke(*args)


def test_eval_counts_grader_errors_per_row_in_the_table_and_metrics(
    tiny_base, tmp_path, monkeypatch
):
    problems = get_task(f"gym:{TASK}").load("test", limit=10)  # eval's held-out problems
    broken = {problems[3].question, problems[7].question}
    break_scorer(monkeypatch, broken)
    result = run_eval(tiny_base, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "grader errors" in result.stdout  # the table's column, shown once there are some
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (row,) = metrics["results"]
    assert row["grader_errors"] == 2 and row["n"] == 10
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").open()]
    errors = {p["index"]: p["grader_error"] for p in predictions if p["grader_error"]}
    assert set(errors) == {3, 7} and all("KeyError: 'broken scorer'" in e for e in errors.values())
    assert all(p["score"] == 0.0 for p in predictions if p["index"] in errors)


def test_eval_without_grader_errors_reports_zero_and_no_column(tiny_base, tmp_path):
    result = run_eval(tiny_base, tmp_path / "out", limit=3)
    assert result.exit_code == 0, result.output
    assert "grader errors" not in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["grader_errors"] for r in metrics["results"]] == [0]


def test_eval_stops_when_the_grader_fails_on_too_many_problems(tiny_base, tmp_path, monkeypatch):
    break_scorer(monkeypatch)
    result = run_eval(tiny_base, tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"the grader of gym:{TASK} (memory off) raised on 10 of 10 answers" in message
    assert f"first: gym:{TASK}/1000000/" in message and "KeyError: 'broken scorer'" in message
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------------------ GRPO
def reward_call(reward, examples, completions):
    columns = rl.example_columns(examples)
    return rl.score([reward], [1.0], [[]] * len(examples), completions, columns)[0][:, 0].tolist()


def test_task_reward_counts_grader_errors_and_stops_the_run(monkeypatch):
    task = get_task(f"gym:{TASK}")
    examples = task.load("train", limit=60)
    break_scorer(monkeypatch, {examples[0].question})
    reward = rl.task_reward(task)
    answers = [f"<answer>{e.answer}</answer>" for e in examples]
    scores = reward_call(reward, examples, answers)
    assert scores == [0.0] + [1.0] * 59  # the error scores 0, the rest are graded as ever
    assert (reward.grader_errors.graded, len(reward.grader_errors.errors)) == (60, 1)
    reward_call(reward, examples[:2], answers[:2])  # 2 of 62: under the tolerance
    with pytest.raises(MemgenError, match=rf"grader of gym:{TASK} raised on 3 of 64 answers"):
        reward_call(reward, examples[:2], answers[:2])  # passes through rl.score unwrapped


def grpo_cfg(tiny_base, out):
    recipe = ROOT / "recipes" / "tiny" / "grpo-weaver.yaml"
    sets = ["training.max_steps=2", "training.max_completion_length=4"]
    return grpo_weaver.resolve_config(
        recipe, sets, base=str(tiny_base), data=f"gym:{TASK}", output=out
    )


def test_grpo_logs_grader_errors_as_a_running_count(tiny_base, tmp_path, monkeypatch):
    break_scorer(monkeypatch, times=1)  # one failure in the whole run: counted, not fatal
    out = grpo_weaver.run(grpo_cfg(tiny_base, tmp_path / "out"))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    counts = [r["rewards/accuracy/grader_errors"] for r in logs if "reward" in r]
    assert counts == [1, 1]


def test_grpo_stops_when_the_grader_keeps_failing(tiny_base, tmp_path, monkeypatch):
    break_scorer(monkeypatch)
    with pytest.raises(MemgenError, match=rf"grader of gym:{TASK} raised on 8 of 8 answers"):
        grpo_weaver.run(grpo_cfg(tiny_base, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
