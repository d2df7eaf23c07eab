"""benchmarks/episodes.py: time per turn with the caches kept, rewound, and re-encoding the
whole history each turn, on a tiny base."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import save_tiny_base

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "episodes.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_episodes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_time_per_turn_for_every_way(tmp_path):
    bench = load_benchmark()
    base = save_tiny_base(tmp_path / "base")
    result = bench.run(str(base), batch=2, turns=4, tokens=3, repeats=1, memory="weaver")
    json.dumps(result)  # one JSON object
    assert set(result["turn_s"]) == {"kept", "rewound", "reencode"}
    assert all(len(t) == 4 and min(t) > 0 for t in result["turn_s"].values())
    for key in ("kept", "rewound", "reencode"):
        assert result[f"{key}_late_over_early"] > 0
    for key in ("reencode_over_kept_late", "reencode_over_kept_total", "rewound_over_kept_total"):
        assert result[key] > 0
    # the official way's last prompt holds every turn: 4 observations of ~90 tokens and 3 replies
    assert result["history_tokens"] > 4 * 300


def test_turn_times_start_at_the_first_prompt():
    bench = load_benchmark()
    assert bench.turn_times([1.5, 2.0, 4.0], start=1.0) == [0.5, 0.5, 2.0]
