"""`memgen baseline sft|grpo|retrieval`: the baselines a weaver is compared with (a command
group): LoRA, or for sft also prompt or prefix tuning; and experience retrieval
(``commands/retrieval.py``)."""

from __future__ import annotations

from pathlib import Path

import typer

from memgen_cli.commands import grpo_weaver, retrieval, sft_weaver
from memgen_cli.commands import options as o
from memgen_cli.stages import baseline as sft_stage
from memgen_cli.stages import baseline_grpo as grpo_stage

app = typer.Typer(
    help="Baselines of the reasoner itself (LoRA; for sft also prompt or prefix tuning), trained "
    "with TRL on the weaver's data and budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

TaskOption = o.option(
    list[str],
    "--task-option",
    "A task option KEY=VALUE (repeatable), as the weaver stages take it; recorded so "
    "that eval draws the same kind of problem.",
)
SFTRecipe = o.option(
    Path,
    "--recipe",
    "Recipe YAML: a BaselineConfig, or an sft-weaver.yaml as it stands (the "
    "baseline then writes beside the weaver's output, as baseline-sft).",
)
GRPORecipe = o.option(
    Path,
    "--recipe",
    "Recipe YAML: a BaselineGRPOConfig, or a grpo-weaver.yaml as it stands (its "
    "init and output name weavers: read as the baseline-sft and baseline-grpo beside "
    "them).",
)
Method = o.option(
    str,
    "--method",
    "lora (default) | prompt | prefix: a LoRA, or PEFT prompt tuning or prefix tuning, at the "
    "weaver's budget (the recipe's `method` key).",
)
Init = o.option(
    Path, "--init", "Start from this `memgen baseline sft` artifact (its adapter; the parent)."
)


@app.command(
    "sft",
    short_help="LoRA-, prompt- or prefix-SFT of the reasoner (TRL SFTTrainer) at the weaver's budget.",
)
@o.options_of(sft_weaver.command)  # the weaver's options, some reworded, and --method
def sft(
    recipe: SFTRecipe = None,
    set_: o.Set = None,
    method: Method = None,
    task_option: TaskOption = None,
    **options,
) -> None:
    """LoRA-SFT of the reasoner with TRL's SFTTrainer: the same examples, prompt, target, steps,
    batches and schedule as sft-weaver. By default (lora.r: null) the rank is the one whose
    trainable-parameter count is closest to the weaver's (the recipe's memory section); both
    counts are printed and recorded in memgen.json. --method prompt | prefix trains PEFT prompt
    or prefix tuning instead, with as many virtual tokens as bring the count closest to the
    weaver's (prompt_learning.num_virtual_tokens: null). The artifact is a PEFT adapter
    directory."""
    o.train(sft_stage, recipe=recipe, set_=set_, method=method, task_option=task_option, **options)


@app.command(
    "grpo", short_help="LoRA-GRPO of the reasoner (TRL GRPOTrainer) at the weaver's budget."
)
@o.options_of(grpo_weaver.command)  # the weaver's options, some reworded
def grpo(
    recipe: GRPORecipe = None, task_option: TaskOption = None, init: Init = None, **options
) -> None:
    """LoRA-GRPO of the reasoner with TRL's GRPOTrainer: G sampled answers per prompt, rewarded
    by the task's grader (and any --reward), with grpo-weaver's prompts, G, sampling, loss,
    steps, batches and schedule. The rank is matched to the weaver's trainable parameters as in
    `baseline sft`, or the --init baseline's adapter is trained further. The artifact is a PEFT
    adapter directory, evaluated by `memgen eval --artifact` like a LoRA-SFT one."""
    o.train(grpo_stage, recipe=recipe, task_option=task_option, init=init, **options)


app.command("retrieval", short_help=retrieval.SHORT_HELP)(retrieval.command)
