"""`memgen baseline sft`: the LoRA baselines a weaver is compared with (a command group, so that
`memgen baseline grpo` can join `sft`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memgen_cli.commands import options as o
from memgen_cli.commands.sft_weaver import DATA_HELP, _columns
from memgen_cli.stages import baseline as stage
from memgen_cli.stages.evaluate import parse_task_options

app = typer.Typer(
    help="LoRA baselines of the reasoner itself, trained with TRL on the weaver's data and budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.command("sft", short_help="LoRA-SFT of the reasoner (TRL SFTTrainer) at the weaver's budget.")
def sft(
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", help="Recipe YAML (a BaselineConfig; a weaver recipe's sections fit)."
        ),
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
            help="A task option KEY=VALUE (repeatable), as sft-weaver takes it; recorded so "
            "that eval draws the same kind of problem.",
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
) -> None:
    """LoRA-SFT of the reasoner with TRL's SFTTrainer: the same examples, prompt, target, steps,
    batches and schedule as sft-weaver. By default (lora.r: null) the rank is the one whose
    trainable-parameter count is closest to the weaver's (the recipe's weaver section); both
    counts are printed and recorded in memgen.json. The artifact is a PEFT adapter directory."""
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
        stage.run(cfg, resume=resume, console=Console())
    except stage.TrainingInterrupted as stop:
        Console(stderr=True).print(
            f"interrupted: checkpoint saved in {stop.checkpoint}; continue with --resume auto"
        )
        raise typer.Exit(130) from None
