"""benchmarks/quality_games.py (the agents table): rows and paired figures read from one eval,
checked against hand-counted agreements on hand-built predictions."""

from __future__ import annotations

import doctest
import json

import pytest
from test_quality_kept import load

# Six games: memory off wins 0 and 1; the weaver wins 0, 2, 3 and 4; LoRA wins 1, 2 and 3.
WINS = {
    ("runs/g/sft-weaver", "off"): {0, 1},
    ("runs/g/sft-weaver", "weaver"): {0, 2, 3, 4},
    ("runs/g/baseline-sft", "off"): {1, 2, 3},
}


@pytest.fixture
def evaluated(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    records = [
        {"task": "textworld:coin_collector", "artifact": art, "mode": mode, "index": i,
         "correct": i in wins}
        for (art, mode), wins in WINS.items() for i in reversed(range(6))  # order is not pairing
    ]  # fmt: skip
    (out / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    results = [
        {"artifact": art, "mode": mode, "accuracy": len(wins) / 6, "stderr": 0.1, "n": 6,
         "mean_steps": 5.0, "invalid_action_rate": 0.0, "weaves_per_episode": 5.0 * (mode == "weaver"),
         "samples_per_s": 1.0}
        for (art, mode), wins in WINS.items()
    ]  # fmt: skip
    config = {"tasks": {"textworld:coin_collector": {"options": {"level": 105}, "seed": 10**6}}}
    (out / "metrics.json").write_text(json.dumps({"results": results, "config": config}))
    return out


def test_the_table_pairs_rows_on_the_same_games(evaluated):
    games = load("quality_games")
    assert doctest.testmod(games).failed == 0
    weaver = {"training": {"wall_s": 300.0, "steps": 16}}
    lora = {"training": {"wall_s": 120.0, "steps": 16, "budget": {"trainable_params": 1000}}}
    out = games.table(evaluated, "textworld:coin_collector", weaver, lora)
    assert set(out["rows"]) == {"weaver:off", "weaver:weaver", "lora-sft"}
    assert out["rows"]["weaver:weaver"]["accuracy"] == pytest.approx(4 / 6)
    vs_off = out["paired"]["weaver_vs_off"]  # off only: game 1; weaver only: 2, 3, 4
    assert (vs_off["reference_only"], vs_off["row_only"]) == (1, 3)
    assert vs_off["diff"] == pytest.approx(2 / 6)
    vs_lora = out["paired"]["weaver_vs_lora"]  # LoRA only: game 1; weaver only: 0, 4
    assert (vs_lora["reference_only"], vs_lora["row_only"]) == (1, 2)
    assert vs_lora["mcnemar_p"] == pytest.approx(1.0)  # 3 discordant, split 1:2
    lora_off = out["paired"]["lora_vs_off"]  # off only: 0; LoRA only: 2, 3
    assert (lora_off["reference_only"], lora_off["row_only"]) == (1, 2)
    assert out["training"]["lora"] == {"wall_s": 120.0, "steps": 16, "trainable_params": 1000}
    assert out["training"]["weaver"]["trainable_params"] is None
    assert out["options"] == {"level": 105} and out["seed"] == 10**6
