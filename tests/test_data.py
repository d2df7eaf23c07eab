"""Task loading: local files and their errors, seeded generation, registry, hub errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memgen_cli.data import KNOWN_TASKS, Example, get_task, read_jsonl, to_messages
from memgen_cli.data.arithmetic import worked_solution
from memgen_cli.data.base import load_hub
from memgen_cli.data.gpqa import GPQATask
from memgen_cli.data.gsm8k import GSM8KTask
from memgen_cli.data.gym import EVAL_SEED, TRAIN_SEED, GSMSymbolicTask, GymTask
from memgen_cli.errors import MemgenError

SHARED_GSM8K = Path(__file__).parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"

GSM_ROWS = [
    {
        "question": "Natalia sold clips to 48 friends in April, and half as many in May. "
        "How many clips did she sell altogether?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
        "Altogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "A shop sells 1,000 pens a day for 2 days. How many pens?",
        "answer": "1000 * 2 = <<1000*2=2000>>2000\n#### 2,000",
    },
    {"question": "What is 5 - 8?", "answer": "5 - 8 = <<5-8=-3>>-3\n#### -3"},
]


def write_jsonl(path: Path, rows: list, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- gsm8k, local


def test_gsm8k_local_file(tmp_path):
    task = get_task(str(write_jsonl(tmp_path / "test.jsonl", GSM_ROWS)))
    assert isinstance(task, GSM8KTask)
    examples = task.load()
    assert [e.answer for e in examples] == ["72", "2000", "-3"]
    assert examples[0].id == "gsm8k/test/0"
    assert "<<" not in examples[0].solution and examples[0].solution.endswith("#### 72")
    assert task.grade("She sold \\boxed{72} clips.", examples[0]) == 1.0
    assert task.grade("She sold \\boxed{2,000} pens.", examples[1]) == 1.0
    assert task.grade("The answer is 3.", examples[2]) == 0.0
    assert task.extract("so \\boxed{-3}") == "-3"


def test_gsm8k_limit_and_seeded_order(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    task = GSM8KTask(path=write_jsonl(tmp_path / "t.jsonl", rows))
    assert [e.answer for e in task.load(limit=3)] == ["0", "1", "2"]
    shuffled = [e.id for e in task.load(limit=5, seed=7)]
    assert shuffled == [e.id for e in task.load(limit=5, seed=7)]
    assert shuffled != [e.id for e in task.load(limit=5)]


def test_gsm8k_directory_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM_ROWS[:1])
    write_jsonl(tmp_path / "test.jsonl", GSM_ROWS)
    task = get_task(str(tmp_path))
    assert len(task.load("train")) == 1 and len(task.load("test")) == 3
    with pytest.raises(MemgenError, match=r"no validation\.jsonl .*train\.jsonl"):
        task.load("validation")


def test_gsm8k_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM_ROWS[0], {"question": "q", "solution": "x"}])
    with pytest.raises(MemgenError) as err:
        GSM8KTask(path=path).load()
    message = str(err.value)
    assert str(path) in message and "record 2" in message
    assert "'answer'" in message and "question, solution" in message


def test_gsm8k_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(MemgenError, match="empty") as err:
        GSM8KTask(path=path).load()
    assert str(path) in str(err.value)


def test_gsm8k_bad_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", GSM_ROWS[:2], extra='{"question": "oops",\n')
    with pytest.raises(MemgenError) as err:
        GSM8KTask(path=path).load()
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_read_jsonl_non_object_line_and_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(MemgenError, match="line 3 is a JSON list"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_text_that_is_not_utf8_is_one_message(tmp_path):
    """A Latin-1 file (an export from a spreadsheet, say) names the file, not a traceback."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        '{"question": "Combien coûte un café ?", "answer": "#### 2"}\n'.encode("latin-1")
    )
    with pytest.raises(MemgenError, match="is not UTF-8 text") as err:
        read_jsonl(path)
    assert str(path) in str(err.value)


def test_gsm8k_missing_final_answer(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(MemgenError, match="####"):
        GSM8KTask(path=path).load()


def test_missing_file_messages(tmp_path):
    with pytest.raises(MemgenError, match="not found"):
        get_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MemgenError, match="not found"):
        GSM8KTask(path=tmp_path / "gone.jsonl").load()


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="shared GSM8K copy not present")
def test_real_gsm8k_test_file():
    examples = GSM8KTask(path=SHARED_GSM8K).load("test", limit=5)
    assert examples[0].answer == "18" and "Janet" in examples[0].question
    assert all(e.answer and "<<" not in e.solution for e in examples)


# --------------------------------------------------------------------------- gsm_symbolic, gym


def test_gsm_symbolic_is_deterministic_per_seed():
    task = get_task("gsm_symbolic")
    a, b = task.load("test", limit=10), task.load("test", limit=10)
    assert [e.question for e in a] == [e.question for e in b]
    assert [e.question for e in task.load("test", limit=10, seed=7)] != [e.question for e in a]
    assert all(e.meta["seed"] == EVAL_SEED for e in a)
    assert a[0].id == f"gsm_symbolic/{EVAL_SEED}/0"


def test_gsm_symbolic_train_and_eval_are_disjoint():
    task = GSMSymbolicTask(exclude_train=2000)
    assert (task.train_seed, task.eval_seed) == (TRAIN_SEED, EVAL_SEED)
    assert task.train_seed != task.eval_seed
    train = {e.question for e in task.load("train", limit=2000)}
    evaluation = task.load("test", limit=300)
    assert len(evaluation) == 300
    assert not train & {e.question for e in evaluation}


def test_gsm_symbolic_solution_and_binary_grading():
    task = get_task("gsm_symbolic")
    example = task.load("train", limit=1)[0]
    assert example.solution.rstrip().endswith(f"#### {example.answer}")
    assert task.grade(f"So the total is \\boxed{{{example.answer}}}.", example) == 1.0
    # reasoning_gym's own scorer would give 0.01 here; accuracy must not.
    assert task.grade("\\boxed{999999}", example) == 0.0
    assert task.grade("no answer at all", example) == 0.0


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum"])
def test_gym_tasks(name):
    task = get_task(f"gym:{name}")
    assert isinstance(task, GymTask) and task.name == f"gym:{name}"
    examples = task.load("train", limit=5)
    assert len(examples) == 5 and examples[0].id == f"gym:{name}/{TRAIN_SEED}/0"
    assert [e.question for e in examples] == [e.question for e in task.load("train", limit=5)]
    for example in examples:
        # a step-by-step working from the expression, ending in the boxed gold answer
        assert example.solution.endswith(f"\\boxed{{{example.answer}}}.")
        assert task.grade(example.solution, example) == 1.0
        assert task.grade(f"Let me compute.\n\\boxed{{{example.answer}}}", example) == 1.0
        assert task.grade(f"<answer>{example.answer}</answer>", example) == 1.0
        assert task.grade(f"So, the final answer is {example.answer}.", example) == 1.0
        assert task.grade("I give up", example) == 0.0
    assert task.extract("work\n\nfinal line") == "final line"
    bare = get_task(f"gym:{name}", steps=False).load("train", limit=5)
    assert all(e.solution == e.answer for e in bare)  # answer-only targets


def test_gym_counts_only_full_scores():
    # reasoning_gym's scorers give partial credit: 0.5 for any wrong number in
    # basic_arithmetic, per-character credit in spell_backward. Accuracy must not.
    arith = get_task("gym:basic_arithmetic")
    example = arith.load("test", limit=1)[0]
    wrong = str(int(example.answer) + 1)
    arith._scorer = lambda answer, entry: 0.5  # a partial-credit scorer is not consulted
    assert arith.grade(f"\\boxed{{{wrong}}}", example) == 0.0
    words = get_task("gym:spell_backward")
    example = words.load("test", limit=1)[0]
    almost = example.answer[:-1] + ("a" if example.answer[-1] != "a" else "b")
    entry = {
        "question": example.question,
        "answer": example.answer,
        "metadata": example.meta["metadata"],
    }
    assert 0 < words._dataset(0, 1).score_answer(almost, entry) < 1
    assert words.grade(f"<answer>{almost}</answer>", example) == 0.0
    assert words.grade(f"<answer>{example.answer}</answer>", example) == 1.0


def test_gym_config_and_errors():
    task = get_task("gym:chain_sum", config={"min_terms": 2, "max_terms": 2})
    assert all(e.meta["metadata"]["num_terms"] == 2 for e in task.load("test", limit=5))
    with pytest.raises(MemgenError, match="gym:chain_sum"):
        get_task("gym:chain_sums")
    with pytest.raises(MemgenError, match="config"):
        get_task("gym:chain_sum", config={"no_such_field": 1}).load("test", limit=1)
    with pytest.raises(MemgenError, match="splits"):
        get_task("gym:chain_sum").load("dev", limit=1)
    with pytest.raises(MemgenError, match="must be a mapping"):
        get_task("gym:chain_sum", config="{min_terms: 2")  # unbalanced YAML stays a string


_DIGEST = """
import hashlib, sys
{make}
print(hashlib.md5("".join(q + a for q, a in pairs).encode()).hexdigest())
"""


def _digest_in_a_process(hash_seed: str, make: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", _DIGEST.format(make=make)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_gym_problems_are_the_same_in_every_process():
    # ransom_note draws its letters from list(a set of str), so reasoning_gym alone gives
    # other problems for the same seed in each process (Python's string hash seed); a task
    # loaded by memgen must not, or two runs' columns would not be the same problems.
    raw = (
        "import reasoning_gym\n"
        "ds = reasoning_gym.create_dataset('ransom_note', seed=1000000, size=40)\n"
        "pairs = [(ds[i]['question'], ds[i]['answer']) for i in range(40)]"
    )
    assert _digest_in_a_process("1", raw) != _digest_in_a_process("2", raw)  # the premise
    ours = (
        "from memgen_cli.data.gym import GymTask\n"
        "pairs = [(e.question, e.answer) for e in GymTask('ransom_note').load('test', limit=40)]"
    )
    digests = {seed: _digest_in_a_process(seed, ours) for seed in ("0", "1", "2")}
    assert len(set(digests.values())) == 1, digests
    assert digests["0"] == _digest_in_a_process("0", raw)  # the problems drawn with no hash salt


def test_a_bad_gym_config_is_one_message_whichever_process_draws_the_problems():
    script = (
        "from memgen_cli.data.gym import GymTask\n"
        "from memgen_cli.errors import MemgenError\n"
        "try:\n"
        "    GymTask('chain_sum', config={'no_such_field': 1}).load('test', limit=1)\n"
        "except MemgenError as e:\n"
        "    print(e)\n"
    )
    for seed in ("0", "1"):  # in this process, and in the child that draws with no hash salt
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.startswith("cannot build reasoning_gym dataset 'chain_sum' with config")
        assert "no_such_field" in done.stdout


def test_gym_loads_do_not_share_items():
    task = get_task("gym:chain_sum")
    first, second = task.load("test", limit=2), task.load("test", limit=2)
    first[0].meta["metadata"]["num_terms"] = -1
    assert second[0].meta["metadata"]["num_terms"] != -1


def test_gym_scorer_crash_scores_zero():
    task = get_task("gym:spell_backward")  # not a number: graded by the dataset's scorer
    example = task.load("test", limit=1)[0]
    task._scorer = lambda answer, entry: 1 / 0  # a scorer choking on odd model output
    assert task.grade(f"<answer>{example.answer}</answer>", example) == 0.0


@pytest.mark.parametrize(
    "expression, answer, lines",
    [
        ("12 - 7 + 30", "35", ["12 - 7 = 5", "5 + 30 = 35"]),
        ("( -9 - 8 )", "-17", ["-9 - 8 = -17"]),
        ("3 + 4 * 2", "11", ["4 * 2 = 8", "3 + 8 = 11"]),
        ("-( 5 + -2 )", "-3", ["5 + -2 = 3", "-(3) = -3"]),
        ("9 / 4", "2.25", ["9 / 4 = 2.25"]),
    ],
)
def test_worked_solution_golden(expression, answer, lines):
    text = worked_solution(expression, answer)
    assert text.split("\n") == [*lines, f"The answer is \\boxed{{{answer}}}."]


def test_worked_solution_refuses_what_it_cannot_write():
    assert worked_solution("1 + 1", "3") is None  # never contradict the gold answer
    assert worked_solution("2 ** 3", "8") is None  # not + - * /
    assert worked_solution("1 / 0", "0") is None
    assert worked_solution("round(2.5)", "2") is None


# --------------------------------------------------------------------------- generic jsonl


def test_jsonl_column_mapping(tmp_path):
    rows = [
        {"uid": "a", "prompt": "2+2?", "target": {"value": "4"}, "why": "2+2=4"},
        {"uid": "b", "prompt": "3*3?", "target": {"value": "9"}, "why": "3*3=9"},
    ]
    path = write_jsonl(tmp_path / "arith.jsonl", rows)
    columns = {"prompt": "prompt", "answer": "target.value", "solution": "why", "id": "uid"}
    task = get_task("jsonl", path=str(path), columns=columns, grader="numeric")
    examples = task.load()
    assert [(e.id, e.question, e.answer, e.solution) for e in examples] == [
        ("a", "2+2?", "4", "2+2=4"),
        ("b", "3*3?", "9", "3*3=9"),
    ]
    assert task.grade("It is \\boxed{4}.", examples[0]) == 1.0
    assert task.grade("It is 8.", examples[1]) == 0.0
    assert task.extract("so 4") == "4"


def test_jsonl_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(MemgenError, match='Did you mean "numeric"'):
        get_task("jsonl", path=str(path), grader="numerc")
    with pytest.raises(MemgenError, match="roles are"):
        get_task("jsonl", path=str(path), columns={"promt": "question"})
    with pytest.raises(MemgenError, match="--data"):
        get_task("jsonl")
    task = get_task("jsonl", path=str(path), columns={"answer": "label"})
    with pytest.raises(MemgenError, match=r"'label'.*answer, question"):
        task.load()
    example = Example(id="x", question="q", answer="a")
    assert get_task("jsonl", path=str(path)).grade("The answer is A", example) == 1.0


# --------------------------------------------------------------------------- other families


def test_math_local(tmp_path):
    rows = [
        {
            "problem": "Compute 1/2 + 0.",
            "solution": "It is $\\boxed{\\frac12}$.",
            "answer": "\\frac{1}{2}",
        },
        {"problem": "Angle?", "solution": "So $\\boxed{90^\\circ}$.", "unique_id": "geo/1"},
    ]
    task = get_task("math", path=str(write_jsonl(tmp_path / "math.jsonl", rows)))
    first, second = task.load()
    assert second.answer == "90^\\circ" and second.id == "geo/1"
    assert task.grade("so \\boxed{0.5}", first) == 1.0
    assert task.grade("so \\boxed{90}", second) == 1.0


def gpqa_rows(n: int) -> list[dict]:
    return [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which particle is number {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a{i}",
            "Incorrect Answer 2": f"wrong b{i}",
            "Incorrect Answer 3": f"wrong c{i}",
        }
        for i in range(n)
    ]


def test_gpqa_options_shuffled_deterministically(tmp_path):
    task = GPQATask(path=write_jsonl(tmp_path / "gpqa.jsonl", gpqa_rows(12)))
    a, b, c = task.load(), task.load(), task.load(seed=1)
    assert [e.question for e in a] == [e.question for e in b]
    assert [e.question for e in a] != [e.question for e in c]
    assert len({e.answer for e in a}) > 1  # the right answer is not always in one place
    for example in a:
        assert example.meta["choices"]["ABCD".index(example.answer)] == example.meta["correct"]
        for letter in "ABCD":
            assert f"\n{letter}) " in example.question
        assert task.grade(f"The answer is ({example.answer}).", example) == 1.0
        wrong = "A" if example.answer != "A" else "B"
        assert task.grade(f"\\boxed{{{wrong}}}", example) == 0.0


def test_triviaqa_local_both_layouts(tmp_path):
    rows = [
        {"question": "Capital of France?", "answer": {"value": "Paris", "aliases": ["Paree"]}},
        {"question": "Fab Four?", "answers": ["The Beatles", "Beatles"]},
    ]
    task = get_task("triviaqa", path=str(write_jsonl(tmp_path / "tqa.jsonl", rows)))
    paris, beatles = task.load()
    assert paris.meta["aliases"] == ["Paris", "Paree"]
    assert task.grade("The answer is paree.", paris) == 1.0
    assert task.grade("Answer: beatles", beatles) == 1.0
    assert task.grade("Answer: Rolling Stones", beatles) == 0.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(MemgenError, match="no answers"):
        get_task("triviaqa", path=str(bad)).load()


def test_kodcode_local_load(tmp_path):
    rows = [
        {
            "question": "Write add(a, b).",
            "test": "from solution import add\n\ndef test_add():\n    assert add(1, 2) == 3\n",
            "test_info": [{"function_name": "add"}],
            "solution": "def add(a, b):\n    return a + b",
        }
    ]
    example = get_task("kodcode", path=str(write_jsonl(tmp_path / "k.jsonl", rows))).load()[0]
    assert example.question.endswith("should be add.")
    assert example.solution.startswith("```python\n") and "from solution" in example.answer


# --------------------------------------------------------------------------- registry, messages


def test_unknown_task_lists_known_ones():
    with pytest.raises(MemgenError) as err:
        get_task("gsm8")
    message = str(err.value)
    assert 'Did you mean "gsm8k"' in message
    for name in ("gsm8k", "gsm_symbolic", "math", "gpqa", "triviaqa", "kodcode", "jsonl", "gym:"):
        assert name in message
    assert "gsm8k" in KNOWN_TASKS and "gym:<name>" in KNOWN_TASKS


def test_unknown_option_is_reported():
    with pytest.raises(MemgenError, match='Did you mean "path"'):
        get_task("gsm8k", pth="x.jsonl")
    with pytest.raises(MemgenError, match="no option 'name'"):
        get_task("gym:chain_sum", name="other")


def test_to_messages():
    example = Example(id="1", question="What is 2+2?", answer="4")
    assert to_messages(example, "Put your answer within \\boxed{}.") == [
        {"role": "user", "content": "What is 2+2?\nPut your answer within \\boxed{}."}
    ]
    assert to_messages(example, "", system="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]


@pytest.fixture
def hub_offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variable at import time; patch the values they keep.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_failure_becomes_memgen_error(hub_offline, monkeypatch):
    with pytest.raises(MemgenError) as err:
        load_hub("memgen-tests/no-such-dataset", None, "test", hint="Try --data file.jsonl.")
    message = str(err.value)
    assert "memgen-tests/no-such-dataset" in message and "could not be reached" in message
    assert message.endswith("Try --data file.jsonl.")

    monkeypatch.setattr("memgen_cli.data.gsm8k.HUB_ID", "memgen-tests/no-such-gsm8k")
    with pytest.raises(MemgenError, match=r"--data path/to/test\.jsonl.*gsm_symbolic"):
        GSM8KTask().load("test")


def test_offline_hint_for_hub_tasks_names_a_working_option(hub_offline, monkeypatch, tmp_path):
    # A bare path is read as GSM8K, so the hint must keep the task and pass the file as an option.
    monkeypatch.setattr("memgen_cli.data.math.HUB_ID", "memgen-tests/no-such-math")
    with pytest.raises(MemgenError, match=r"--data math --task-option path=path/to/math\.jsonl"):
        get_task("math").load("test")
    local = tmp_path / "math.jsonl"
    local.write_text('{"problem": "1+1?", "solution": "\\\\boxed{2}", "answer": "2"}\n')
    examples = get_task("math", path=str(local)).load("test")
    assert [e.answer for e in examples] == ["2"]
