"""`memgen sft-weaver`: train the memory weaver by supervised fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memgen_cli.commands import options as o
from memgen_cli.console import make_console
from memgen_cli.errors import MemgenError
from memgen_cli.stages import sft_weaver as stage
from memgen_cli.stages.evaluate import parse_task_options

DATA_HELP = (
    "gsm_symbolic (default, offline), gsm8k (hub), gym:<name> (any reasoning_gym task; "
    "tasks without worked solutions train on bare answers), or a .jsonl file: GSM8K format "
    "(question, answer ending in '#### N'), or any columns with --columns."
)


def command(
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe YAML (an SFTConfig).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key: a.b=value (repeatable)."),
    ] = None,
    base: o.Base = None,
    data: Annotated[str | None, typer.Option("--data", help=DATA_HELP)] = None,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="Columns of a generic .jsonl: prompt=…,solution=…,answer=…"),
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option",
            help="A task option KEY=VALUE (repeatable), as `memgen eval` takes it, e.g. "
            "'config={min_terms: 2, max_terms: 3}' for a reasoning_gym difficulty; recorded in "
            "the artifact so that eval draws the same kind of problem.",
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Artifact directory.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="auto (latest checkpoint of this output, if any) or a checkpoint folder.",
        ),
    ] = None,
    report_to: Annotated[
        str | None, typer.Option("--report-to", help="none | tensorboard | wandb.")
    ] = None,
    overwrite: o.Overwrite = False,
) -> None:
    """Train the weaver by SFT: the frozen reasoner learns nothing; latents learn to help it."""
    cfg = stage.resolve_config(
        recipe,
        set_,
        base=base,
        data=data,
        columns=_columns(columns),
        task_options=parse_task_options(task_option or []),
        output=output,
        report_to=report_to,
    )
    try:
        stage.run(cfg, resume=resume, console=make_console(), overwrite=overwrite)
    except stage.TrainingInterrupted as stop:
        Console(stderr=True).print(
            f"interrupted: checkpoint saved in {stop.checkpoint}; continue with --resume auto"
        )
        raise typer.Exit(130) from None


def _columns(spec: str | None) -> dict[str, str] | None:
    if spec is None:
        return None
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise MemgenError(
            f'--columns expects role=column pairs, e.g. prompt=question,answer=label; got "{spec}".'
        )
    return {role.strip(): col.strip() for role, col in pairs}
