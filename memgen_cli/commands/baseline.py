"""`memgen baseline sft|grpo`: the LoRA baselines a weaver is compared with (a command group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memgen_cli.commands import options as o
from memgen_cli.commands.grpo_weaver import DATA_HELP as GRPO_DATA_HELP
from memgen_cli.commands.sft_weaver import DATA_HELP, _columns
from memgen_cli.console import make_console
from memgen_cli.stages import baseline as sft_stage
from memgen_cli.stages import baseline_grpo as grpo_stage
from memgen_cli.stages.evaluate import parse_task_options

app = typer.Typer(
    help="LoRA baselines of the reasoner itself, trained with TRL on the weaver's data and budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

Data = Annotated[str | None, typer.Option("--data", help=DATA_HELP)]
TaskOption = Annotated[
    list[str] | None,
    typer.Option(
        "--task-option",
        help="A task option KEY=VALUE (repeatable), as the weaver stages take it; recorded so "
        "that eval draws the same kind of problem.",
    ),
]


def _train(stage, cfg, resume: str | None, overwrite: bool) -> None:
    """Run a baseline stage; Ctrl-C leaves a checkpoint and exits 130."""
    try:
        stage.run(cfg, resume=resume, console=make_console(), overwrite=overwrite)
    except stage.TrainingInterrupted as stop:
        Console(stderr=True).print(
            f"interrupted: checkpoint saved in {stop.checkpoint}; continue with --resume auto"
        )
        raise typer.Exit(130) from None


@app.command("sft", short_help="LoRA-SFT of the reasoner (TRL SFTTrainer) at the weaver's budget.")
def sft(
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="Recipe YAML: a BaselineConfig, or an sft-weaver.yaml as it stands (the "
            "baseline then writes beside the weaver's output, as baseline-sft).",
        ),
    ] = None,
    set_: o.Set = None,
    base: o.Base = None,
    data: Data = None,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="Columns of a generic .jsonl: prompt=…,solution=…,answer=…"),
    ] = None,
    task_option: TaskOption = None,
    output: o.Output = None,
    resume: o.Resume = None,
    report_to: o.ReportTo = None,
    overwrite: o.Overwrite = False,
) -> None:
    """LoRA-SFT of the reasoner with TRL's SFTTrainer: the same examples, prompt, target, steps,
    batches and schedule as sft-weaver. By default (lora.r: null) the rank is the one whose
    trainable-parameter count is closest to the weaver's (the recipe's memory section); both
    counts are printed and recorded in memgen.json. The artifact is a PEFT adapter directory."""
    cfg = sft_stage.resolve_config(
        recipe,
        set_,
        base=base,
        data=data,
        columns=_columns(columns),
        task_options=parse_task_options(task_option or []),
        output=output,
        report_to=report_to,
    )
    _train(sft_stage, cfg, resume, overwrite)


@app.command(
    "grpo", short_help="LoRA-GRPO of the reasoner (TRL GRPOTrainer) at the weaver's budget."
)
def grpo(
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="Recipe YAML: a BaselineGRPOConfig, or a grpo-weaver.yaml as it stands (its "
            "init and output name weavers: read as the baseline-sft and baseline-grpo beside "
            "them).",
        ),
    ] = None,
    set_: o.Set = None,
    base: o.Base = None,
    data: Annotated[str | None, typer.Option("--data", help=GRPO_DATA_HELP)] = None,
    task_option: TaskOption = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from this `memgen baseline sft` artifact (its adapter; the parent).",
        ),
    ] = None,
    reward: o.Reward = None,
    reward_weight: o.RewardWeight = None,
    output: o.Output = None,
    resume: o.Resume = None,
    report_to: o.ReportTo = None,
    overwrite: o.Overwrite = False,
) -> None:
    """LoRA-GRPO of the reasoner with TRL's GRPOTrainer: G sampled answers per prompt, rewarded
    by the task's grader (and any --reward), with grpo-weaver's prompts, G, sampling, loss,
    steps, batches and schedule. The rank is matched to the weaver's trainable parameters as in
    `baseline sft`, or the --init baseline's adapter is trained further. The artifact is a PEFT
    adapter directory, evaluated by `memgen eval --artifact` like a LoRA-SFT one."""
    cfg = grpo_stage.resolve_config(
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
    _train(grpo_stage, cfg, resume, overwrite)
