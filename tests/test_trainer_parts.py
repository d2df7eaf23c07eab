"""The training progress line: a live bar on a terminal, a line per logging step in a log."""

from __future__ import annotations

import io

from rich.console import Console
from transformers import TrainerControl, TrainerState, TrainingArguments

from memgen_cli.training.trainer_parts import RichProgress, Throughput


def _run(console: Console) -> None:
    progress = RichProgress(Throughput(4), console)
    args = TrainingArguments(output_dir="unused", report_to="none")
    state, control = TrainerState(max_steps=4), TrainerControl()
    progress.on_train_begin(args, state, control)
    for step in range(1, 5):
        state.global_step = step
        progress.on_step_end(args, state, control)
        if step % 2 == 0:
            progress.on_log(args, state, control, logs={"loss": 1.0 / step, "learning_rate": 1e-3})
    progress.on_train_end(args, state, control)


def test_log_file_gets_a_line_per_logging_step():
    out = io.StringIO()
    _run(Console(file=out, force_terminal=False, width=120))
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("step ")], (
        out.getvalue()
    )  # no bar drawn into the file
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert "loss 0.5000" in lines[0] and "loss 0.2500" in lines[1]


def test_terminal_gets_the_live_bar_only():
    out = io.StringIO()
    _run(Console(file=out, force_terminal=True, width=120))
    assert "training" in out.getvalue() and "step 2/4" not in out.getvalue()
