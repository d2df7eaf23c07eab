"""TextWorld tasks: games generated offline from seeds, cached, played to a win by their
walkthrough; held-out games disjoint from training ones; one message when TextWorld is missing."""

from __future__ import annotations

import doctest
import sys
from importlib.util import find_spec

import pytest
from typer.testing import CliRunner

from memgen_cli.cli import app
from memgen_cli.data import get_task
from memgen_cli.data import textworld as tw_task
from memgen_cli.data.textworld import INSTALL, INVALID, TRAIN_SEED, TextWorldTask
from memgen_cli.errors import MemgenError

needs_textworld = pytest.mark.skipif(
    find_spec("textworld") is None,
    reason="textworld is not installed: `make setup` installs it (pip install -e '.[agents]')",
)


def test_doctests():
    assert doctest.testmod(tw_task).failed == 0


@needs_textworld
@pytest.mark.parametrize(
    "challenge, objective", [("coin_collector", "brief"), ("treasure_hunter", "detailed")]
)
def test_walkthrough_wins_a_generated_game(cached, challenge, objective):
    task = get_task(f"textworld:{challenge}", level=5, objective=objective, exclude_train=0)
    (game,) = task.load("test", 1)
    walkthrough = game.meta["walkthrough"]
    assert walkthrough[-1].startswith("take ") and game.solution == "\n".join(walkthrough)
    env = task.environment(game)
    try:
        first = env.reset()
        # cleaned: no title banner, no prompt or status line; the objective, commands, instruction
        assert "$$" not in first.text and "-= " in first.text and ">" not in first.text
        assert first.text.startswith(game.question)
        if objective == "brief":  # the goal without the route the generated objective gives
            detailed = get_task(f"textworld:{challenge}", level=5, exclude_train=0)
            route = detailed.game(game.meta["seed"])["objective"]
            assert game.question == "Find the coin and take it." and route not in first.text
            assert detailed.game(game.meta["seed"])["walkthrough"] == walkthrough
        assert f"Available commands: {', '.join(first.commands)}." in first.text
        assert first.expert == walkthrough and not first.done
        invalid = env.step(None)  # answered, and the game does not move
        assert invalid.text.startswith(INVALID) and invalid.commands == first.commands
        assert invalid.expert == walkthrough and invalid.reward == 0 and not invalid.done
        assert env.step("not a command").text.startswith(INVALID)
        seen = []
        for command in walkthrough:
            assert command in seen[-1].commands if seen else command in first.commands
            seen.append(env.step(command))
        assert [o.won for o in seen] == [False] * (len(walkthrough) - 1) + [True]
        assert seen[-1].done and seen[-1].reward == 1.0 and sum(o.reward for o in seen) == 1.0
        assert seen[0].expert == walkthrough[1:]
    finally:
        env.close()


@needs_textworld
def test_games_are_cached_by_challenge_settings_and_seed(empty_home, monkeypatch):
    task = TextWorldTask("coin_collector", level=5, objective="brief", exclude_train=0)
    (game,) = task.load("test", 1)
    folder = task.cache_dir()
    assert folder.relative_to(empty_home).parts[0] == "textworld"
    assert folder.parts[-2:] == ("coin_collector", "level5-brief")
    seed = game.meta["seed"]
    written = lambda: {p.name for p in folder.iterdir()}  # noqa: E731
    assert written() == {f"{seed}.meta.json"}  # described when loaded, compiled when played
    assert task.compiled(seed) == folder / f"{seed}.z8"
    assert written() == {f"{seed}.meta.json", f"{seed}.json", f"{seed}.z8"}

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached game was generated again")

    monkeypatch.setattr(TextWorldTask, "_make", no_generation)
    again = TextWorldTask("coin_collector", level=5, objective="brief", exclude_train=0)
    assert again.load("test", 1)[0] == game
    assert again.compiled(seed) == folder / f"{seed}.z8"
    # other settings are other games, in another folder
    detailed = TextWorldTask("coin_collector", level=5, objective="detailed", exclude_train=0)
    assert detailed.cache_dir() != folder


@needs_textworld
def test_heldout_games_are_disjoint_from_training_games(cached):
    train_size = 5
    task = get_task("textworld:coin_collector", level=3, exclude_train=train_size)
    train = task.load("train", train_size)
    assert [g.meta["seed"] for g in train] == list(range(TRAIN_SEED, TRAIN_SEED + train_size))
    routes = {tuple(g.meta["walkthrough"]) for g in train}
    # held-out seeds asked to start inside the training range: training seeds are skipped, and
    # so is any game whose route (walkthrough) a training game has
    heldout = task.load("test", 3, seed=TRAIN_SEED)
    seeds = [g.meta["seed"] for g in heldout]
    assert len(seeds) == 3 and min(seeds) >= TRAIN_SEED + train_size
    assert not routes & {tuple(g.meta["walkthrough"]) for g in heldout}
    skipped = set(range(TRAIN_SEED + train_size, max(seeds))) - set(seeds)
    assert skipped and all(tuple(task.game(s)["walkthrough"]) in routes for s in skipped)
    # the default held-out seeds are far from the training ones
    assert min(g.meta["seed"] for g in task.load("test", 2)) >= tw_task.EVAL_SEED


@needs_textworld
def test_too_few_distinct_routes_is_one_clear_error(cached, monkeypatch):
    monkeypatch.setattr(tw_task, "TRIES_PER_GAME", 0)
    task = get_task("textworld:coin_collector", level=3, exclude_train=5)
    monkeypatch.setattr(task, "game", lambda seed: {"walkthrough": ["go east", "take coin"]})
    with pytest.raises(MemgenError, match="few routes exist at this level"):
        task.load("test", 2)


@needs_textworld
@pytest.mark.parametrize(
    "options, message",
    [
        ({"level": 0}, "level must be 1-300"),
        ({"level": 31}, "level must be 1-30"),
        ({"objective": "short"}, "objective must be detailed or brief"),
        ({"max_turns": 0}, "max_turns must be at least 1"),
        ({"turns": 5}, "has no option 'turns'"),
    ],
)
def test_bad_options_are_refused(options, message):
    challenge = "treasure_hunter" if options.get("level") == 31 else "coin_collector"
    with pytest.raises(MemgenError, match=message):
        get_task(f"textworld:{challenge}", **options)


@needs_textworld
def test_unknown_challenge_suggests_one():
    with pytest.raises(MemgenError, match='Did you mean "coin_collector"'):
        get_task("textworld:coin_colector")


def test_missing_textworld_is_one_message_and_exit_2(monkeypatch, tiny_weaver, tmp_path):
    monkeypatch.setitem(sys.modules, "textworld", None)  # `import textworld` raises ImportError
    with pytest.raises(MemgenError, match="not installed") as raised:
        get_task("textworld:coin_collector")
    assert INSTALL in str(raised.value) and ".[agents]" in str(raised.value)
    _, artifact = tiny_weaver
    args = ["eval", "--artifact", str(artifact), "--data", "textworld:coin_collector"]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "eval")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert text.count("error:") == 1 and INSTALL in text and "Traceback" not in result.output


class Expert:
    """A TextWorld game that plays its expert's next command whatever the agent says: the
    engine's turns then follow the walkthrough to a win (the agent's own actions are still
    parsed and counted)."""

    def __init__(self, env):
        self.env, self.last = env, None

    def reset(self):
        self.last = self.env.reset()
        return self.last

    def step(self, action):
        self.last = self.env.step(self.last.expert[0])
        return self.last

    def close(self):
        self.env.close()


@needs_textworld
def test_the_episode_engine_plays_textworld_games_to_a_win(cached, one_thread):
    from conftest import make_memgen
    from memgen_cli.config import GenerationConfig
    from memgen_cli.generation import EpisodeConfig, play

    tasks = [  # the games test_walkthrough_wins_a_generated_game made (cached)
        get_task("textworld:coin_collector", level=5, objective="brief", exclude_train=0),
        get_task("textworld:treasure_hunter", level=5, exclude_train=0),
    ]
    games = [task.load("test", 1)[0] for task in tasks]
    routes = [g.meta["walkthrough"] for g in games]
    assert len({len(r) for r in routes}) == 2  # episodes that end at different turns
    envs = [Expert(task.environment(g)) for task, g in zip(tasks, games, strict=True)]
    cfg = GenerationConfig(max_new_tokens=4, memory="weaver")
    try:
        played = play(make_memgen("llama"), envs, cfg, EpisodeConfig(max_turns=10))
    finally:
        for env in envs:
            env.close()
    for ep, route in zip(played, routes, strict=True):
        assert ep.won and ep.done and ep.turns == len(route) and sum(ep.rewards) == 1.0
        assert ep.invalid == ep.actions.count(None) > 0  # a random tiny model names no command
        users = [m["content"] for m in ep.messages if m["role"] == "user"]
        assert len(users) == ep.turns + 1 and users[0].startswith(ep.messages[0]["content"][:20])
        assert "Available commands:" in users[1] and "$$" not in "".join(users)
        assert ep.weaves >= ep.turns  # prompt latents at every turn's start


@needs_textworld
def test_eval_on_textworld_reports_episodes(cached, tiny_weaver, tmp_path, one_thread):
    import json

    _, artifact = tiny_weaver
    out = tmp_path / "eval"
    args = ["eval", "--artifact", str(artifact), "--data", "textworld:coin_collector"]
    args += ["--limit", "2", "--max-new-tokens", "4", "--output", str(out)]
    args += ["--task-option", "max_turns=3", "--task-option", "exclude_train=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["mode"] for r in rows] == ["off", "weaver"]
    for row in rows:
        assert row["n"] == 2 and row["mean_steps"] == 3.0  # nobody wins: the turn limit
        assert 0 <= row["invalid_action_rate"] <= 1 and row["accuracy"] == 0.0
        assert f"memory {row['mode']}: success 0.0 ± 0.0 %, 3.0 steps" in result.output
        assert f"memory {row['mode']}: 2/2" in result.output  # a log's line per batch
    assert rows[0]["weaves_per_episode"] == 0 and rows[1]["weaves_per_episode"] >= 3
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    woven = next(r for r in records if r["mode"] == "weaver")
    assert woven["episode"]["turns"] == 3 and len(woven["transcript"]) == 1 + 2 * 3
    replies = [m["content"] for m in woven["transcript"] if m["role"] == "assistant"]
    assert all(reply.startswith("⟨mem ") for reply in replies)  # prompt latents each turn
    assert woven["prompt"].startswith(woven["transcript"][0]["content"][:30])
    assert woven["gold"] and woven["extracted"].count(";") == 2


@needs_textworld
def test_a_first_long_generation_says_what_it_makes(empty_home, monkeypatch, capsys):
    task = TextWorldTask("coin_collector", level=7, exclude_train=25)
    made = lambda seed: {"walkthrough": [f"go {seed}", "take coin"], "objective": "o"}  # noqa: E731
    monkeypatch.setattr(task, "game", made)
    assert len(task.load("test", 2)) == 2
    note = " ".join(capsys.readouterr().err.split())
    assert "making up to 25 training and 2+ held-out games" in note and str(empty_home) in note
    task.cache_dir().mkdir(parents=True)
    (task.cache_dir() / "1.meta.json").write_text("{}")  # a cache already there: no note
    task.load("train", 30)
    assert capsys.readouterr().err == ""


@needs_textworld
def test_a_long_search_for_held_out_games_logs_a_line_per_so_many_games_made(
    empty_home, monkeypatch, capsys
):
    # Every fourth seed has a route of its own; the others repeat the training games' route.
    task = TextWorldTask("coin_collector", level=7, exclude_train=2)
    route = lambda seed: [f"go {seed}"] if seed % 4 == 0 else ["go home"]  # noqa: E731
    monkeypatch.setattr(task, "game", lambda seed: {"walkthrough": route(seed), "objective": "o"})
    monkeypatch.setattr(tw_task, "PROGRESS_EVERY", 5)
    seeds = [e.meta["seed"] for e in task.load("test", 5)]
    assert seeds == [1_000_000 + 4 * k for k in range(5)]
    lines = [line for line in capsys.readouterr().err.splitlines() if "games made" in line]
    assert lines == [
        "textworld:coin_collector: 5 games made, 2 of 5 held-out games found (seeds "
        "1000000-1000004)",
        "textworld:coin_collector: 10 games made, 3 of 5 held-out games found (seeds "
        "1000000-1000009)",
        "textworld:coin_collector: 15 games made, 4 of 5 held-out games found (seeds "
        "1000000-1000014)",
    ]
    task.cache_dir().mkdir(parents=True)
    for seed in range(1_000_000, 1_000_017):  # all cached now: nothing made, nothing said
        (task.cache_dir() / f"{seed}.meta.json").write_text("{}")
    assert len(task.load("test", 5)) == 5
    assert capsys.readouterr().err == ""
