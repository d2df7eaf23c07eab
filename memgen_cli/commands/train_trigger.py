"""`memgen train-trigger`: learn when to weave (RL on the trigger, weaver frozen)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memgen_cli.commands import options as o
from memgen_cli.console import make_console
from memgen_cli.stages import train_trigger as stage
from memgen_cli.stages.evaluate import parse_task_options


def command(
    artifact: Annotated[
        Path | None,
        typer.Option("--artifact", help="The weaver artifact whose trigger to train (required)."),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe YAML (a TriggerConfig).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key: a.b=value (repeatable)."),
    ] = None,
    base: o.Base = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="A task (gsm_symbolic, gsm8k, gym:<name>, ...) or a .jsonl."),
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option("--task-option", help="A task option KEY=VALUE (repeatable)."),
    ] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option("--reward", help="Extra reward module:function (repeatable)."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Artifact directory.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="auto (latest checkpoint of this output, if any) or a checkpoint folder.",
        ),
    ] = None,
    overwrite: o.Overwrite = False,
) -> None:
    """Train the memory trigger by RL: G rollouts per prompt with sampled INVOKE/SKIP decisions,
    rewarded by the task's grader minus the sparsity penalty (paper Eq. 9); the weaver is
    frozen and the new artifact records it as its parent."""
    cfg = stage.resolve_config(
        recipe,
        set_,
        artifact=artifact,
        base=base,
        data=data,
        task_options=parse_task_options(task_option or []),
        rewards=reward,
        output=output,
    )
    try:
        stage.run(cfg, resume=resume, console=make_console(), overwrite=overwrite)
    except stage.TrainingInterrupted as stop:
        Console(stderr=True).print(
            f"interrupted: checkpoint saved in {stop.checkpoint}; continue with --resume auto"
        )
        raise typer.Exit(130) from None
