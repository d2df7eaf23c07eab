"""`memgen generate --play` and `memgen inspect-memory --data` on TextWorld games: the played
game equals eval's, the JSON holds the episode, the turn-start latents are clustered one set per
woven turn, and the refusals are one message each (exit 2)."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
from typer.testing import CliRunner

from memgen_cli.cli import app

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        find_spec("textworld") is None,
        reason="textworld is not installed: `make setup` installs it (pip install -e '.[agents]')",
    ),
]
GAME = ["--task-option", "max_turns=3", "--task-option", "exclude_train=0"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_play_prints_the_game_eval_plays(cached, tiny_weaver, tmp_path):
    _, artifact = tiny_weaver
    common = ["--artifact", artifact, "--max-new-tokens", 4, "--seed", 1_000_001, *GAME]
    shown = invoke("generate", "--play", "textworld:coin_collector", *common)
    assert shown.exit_code == 0, shown.output
    played = invoke("generate", "--play", "textworld:coin_collector", *common, "--json")
    assert played.exit_code == 0, played.output
    rec = json.loads(played.stdout)
    out = tmp_path / "eval"
    evaluated = invoke(
        "eval", "--data", "textworld:coin_collector", "--limit", 1, "--memory", "weaver",
        "--output", out, *common,
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    [same] = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert rec["seed"] == 1_000_001 and same["id"] == rec["id"] == "coin_collector-level5-1000001"
    assert rec["episode"]["actions"] == same["episode"]["actions"]
    assert rec["transcript"] == same["transcript"]
    ep = rec["episode"]
    assert ep["turns"] == 3 and ep["won"] is False and ep["weaves"] == len(rec["insertions"])
    assert ep["invalid"] == sum(a is None for a in ep["actions"])
    assert rec["mode"] == "weaver" and rec["task_options"] == {"max_turns": 3, "exclude_train": 0}
    assert [m["role"] for m in rec["transcript"]] == ["user", "assistant"] * 3 + ["user"]
    assert [i["turn"] for i in rec["insertions"] if i["kind"] == "prompt"] == [0, 1, 2]
    # the terminal view: each turn's observation, marked reply and action, then the outcome
    text = shown.stdout
    assert text.count("⟨mem 3⟩") >= 3 and "turn 3" in text
    actions = [a or "invalid" for a in ep["actions"]]
    assert [
        line.split("action: ")[1].strip() for line in text.splitlines() if "action: " in line
    ] == actions
    assert f"lost (turn limit) · 3 turns · {ep['invalid']} invalid action" in text
    assert f"{ep['weaves']} weaves · memory weaver" in text


def test_inspect_memory_clusters_one_latent_set_per_woven_turn(cached, tiny_weaver, tmp_path):
    _, artifact = tiny_weaver
    out = tmp_path / "inspect"
    result = invoke(
        "inspect-memory", "--artifact", artifact, "--data", "textworld:coin_collector",
        "--limit", 2, "--max-new-tokens", 4, "--clusters", 2, "--output", out, *GAME,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "inspect.json").read_text())
    assert report["schema_version"] == 4 and report["task"] == "textworld:coin_collector"
    games = report["episodes"]
    assert games["games"] == 2 and games["turns"] == [3, 3] and games["woven_turns"] == 6
    assert set(games["not_applicable"]) == {"drop_cluster", "position_in_reply"}
    prompts = [r for r in report["insertions"] if r["kind"] == "prompt"]
    for e, example in enumerate(report["examples"]):
        mine = [r for r in prompts if r["example"] == e]
        assert [r["turn"] for r in mine] == [0, 1, 2]  # one latent set per woven turn
        assert [r["relative_position"] for r in mine] == [0.0, 0.5, 1.0]  # the turn's place
        assert all(r["token_index"] == 0 and r["num_latents"] == 3 for r in mine)
        assert all(len(r["nearest_tokens"]) == 3 for r in mine)
        assert example["turns"] == 3 and example["correct"] == 0.0 and example["answer"]
        markers = [s["insertion"] for s in example["segments"] if "insertion" in s]
        assert markers == [r["id"] for r in report["insertions"] if r["example"] == e]
    assert report["accuracy"] == 0.0
    assert all("commands" in r["text_before"] for r in prompts)  # the observation before
    clusters = report["clusters"]
    assert sum(s["size"] for s in clusters["stats"]) == len(report["insertions"])
    assert "2 games, success 0.0%" in result.stdout and "6 of 6 turns" in result.stdout
    assert "turn in episode" in result.stdout and "not applicable to episodes" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["generate", "--play", "textworld:coin_collector", "--interactive"],
            "without --interactive",
        ),
        (["generate", "Hello?", "--play", "textworld:coin_collector"], "without a PROMPT"),
        (["generate", "--play", "gsm8k"], "'gsm8k' is not one"),
        (
            ["inspect-memory", "--data", "textworld:coin_collector", "--drop-cluster", 0],
            "--drop-cluster does not apply to textworld:coin_collector",
        ),
    ],
)
def test_refusals_are_one_message_and_exit_2(args, message, tiny_weaver):
    result = invoke(*args, "--artifact", tiny_weaver[1])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
