"""`memgen grpo-weaver`: train the memory weaver with GRPO on verifiable rewards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memgen_cli.commands import options as o
from memgen_cli.console import make_console
from memgen_cli.stages import grpo_weaver as stage
from memgen_cli.stages.evaluate import parse_task_options

DATA_HELP = (
    "gsm_symbolic (default, offline), gsm8k (hub), gym:<name> (any reasoning_gym task), "
    "math, kodcode (rewarded by running its tests in the sandbox), or a GSM8K-format .jsonl "
    "file."
)


def command(
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe YAML (a GRPOConfig).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key: a.b=value (repeatable)."),
    ] = None,
    base: o.Base = None,
    data: Annotated[str | None, typer.Option("--data", help=DATA_HELP)] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option",
            help="A task option KEY=VALUE (repeatable), as `memgen eval` takes it, e.g. "
            "'config={min_terms: 2, max_terms: 3}' for a reasoning_gym difficulty or path=FILE "
            "for a local copy; recorded in the artifact so that eval draws the same problems.",
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this artifact (e.g. an SFT weaver); its parent."),
    ] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option(
            "--reward",
            help="Extra reward module:function with TRL's signature "
            "f(prompts, completions, **columns) (repeatable; the task's grader always counts "
            "unless reward.task_weight=0).",
        ),
    ] = None,
    reward_weight: Annotated[
        list[float] | None,
        typer.Option("--reward-weight", help="Weight of each --reward, in order (default 1)."),
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
    """Train the weaver by GRPO: G sampled answers per prompt with latents woven, rewarded by
    the task's grader; only the weaver learns."""
    cfg = stage.resolve_config(
        recipe,
        set_,
        base=base,
        data=data,
        task_options=parse_task_options(task_option or []),
        init=init,
        rewards=reward,
        reward_weights=reward_weight,
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
