"""The CLI: --help everywhere, and `memgen generate` one-shot, batch and interactive."""

import json

import pytest
from typer.testing import CliRunner

from memgen_cli.cli import COMMANDS, app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def test_help_lists_all_six_stages():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in (
        "sft-weaver",
        "grpo-weaver",
        "train-trigger",
        "eval",
        "generate",
        "inspect-memory",
    ):
        assert name in result.output


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_generate_without_artifact_says_memory_is_off(tiny_base):
    result = invoke("generate", "What is 2+2?", "--base", tiny_base, "--max-new-tokens", "6")
    assert result.exit_code == 0
    assert "memory is off" in result.output and "[memory off: 0 insertions]" in result.output


def test_generate_one_shot_with_artifact_shows_markers_and_json(tiny_weaver):
    _, art = tiny_weaver
    result = invoke("generate", "Hello, there.", "--artifact", art, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert "⟨mem 3⟩" in result.output  # the prompt insertion (K=3 in the tiny artifact)
    result = invoke("generate", "Hello", "--artifact", art, "--max-new-tokens", "12", "--json")
    data = json.loads(result.stdout)
    assert data["memory"] == "weaver" and data["insertions"][0]["kind"] == "prompt"
    assert (
        data["insertions"][0]["token_index"] == 0
        and len(data["insertions"][0]["latent_norms"]) == 3
    )
    assert data["num_tokens"] <= 12


def test_generate_batch_file(tiny_weaver, tmp_path):
    _, art = tiny_weaver
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"question {i}, please."}) + "\n" for i in range(5))
    )
    out = tmp_path / "out" / "answers.jsonl"
    result = invoke(
        "generate",
        "--input",
        prompts,
        "--output",
        out,
        "--artifact",
        art,
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"question {i}, please." for i in range(5)]
    assert all(r["insertions"][0]["kind"] == "prompt" for r in rows)


@pytest.mark.parametrize(
    "lines,message",
    [
        ('{"prompt": "ok"}\n{oops\n', "line 2 is not valid JSON"),
        ('{"text": "no prompt field"}\n', 'line 1 needs a "prompt"'),
        ("", "holds no prompts"),
    ],
)
def test_generate_batch_bad_input(tiny_base, tmp_path, lines, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(lines)
    result = invoke(
        "generate", "--input", prompts, "--output", tmp_path / "o.jsonl", "--base", tiny_base
    )
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.jsonl").exists()


def test_generate_errors_exit_2(tiny_weaver, tmp_path):
    _, art = tiny_weaver
    result = invoke("generate", "hi", "--artifact", art, "--memory", "full")
    assert result.exit_code == 2 and "needs a trained trigger" in result.output
    result = invoke("generate", "hi", "--artifact", tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("generate")
    assert result.exit_code == 2 and "exactly one of" in result.output


def test_interactive_chat_through_stdin(tiny_weaver):
    _, art = tiny_weaver
    script = "Hello, you.\n/trace\n/memory off\nAgain.\n/trace\n/clear\n/bogus\n/exit\n"
    result = invoke(
        "generate", "--interactive", "--artifact", art, "--max-new-tokens", "8", input=script
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("memgen>") == 2  # two answers
    first_answer = out.split("memgen>")[1].split("insertions in the last answer")[0]
    assert first_answer.lstrip().startswith("⟨mem 3⟩")  # the prompt insertion, streamed first
    assert "insertions in the last answer" in out and "prompt" in out and "always" in out
    assert "memory off" in out and "history cleared" in out and "commands:" in out


def test_interactive_leaves_cleanly_on_eof(tiny_base):
    result = invoke(
        "generate", "--interactive", "--base", tiny_base, "--max-new-tokens", "4", input="hi\n"
    )
    assert result.exit_code == 0 and result.output.count("memgen>") == 1


def test_train_trigger_without_an_artifact_says_what_it_needs():
    result = invoke("train-trigger")
    assert result.exit_code == 2 and "needs --artifact DIR" in result.output


@pytest.mark.slow
def test_generate_on_embedded_model(tmp_path):
    result = invoke("generate", "What is 3 + 4?", "--max-new-tokens", "24", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["memory"] == "off" and data["num_tokens"] > 0 and "7" in data["completion"]


@pytest.mark.slow
def test_interactive_on_embedded_model_with_untrained_weaver(tmp_path):
    import torch

    from memgen_cli.artifacts import save_artifact
    from memgen_cli.config import MemoryConfig
    from memgen_cli.models.base import load_base
    from memgen_cli.models.memgen import MemGenModel

    torch.manual_seed(0)
    base = load_base(device="cpu")
    art = save_artifact(
        MemGenModel(base.model, base.tokenizer, MemoryConfig()), base, tmp_path / "art"
    )
    script = "What is 2 + 2? Answer in one sentence.\n/trace\n/exit\n"
    result = invoke("generate", "-i", "--artifact", art, "--max-new-tokens", "24", input=script)
    assert result.exit_code == 0, result.output
    assert "⟨mem 8⟩" in result.output and "insertions in the last answer" in result.output
