"""`memgen generate`: one answer, a file of answers, or an interactive chat."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memgen_cli.commands import options as o
from memgen_cli.config import GenerationConfig
from memgen_cli.stages import generate as stage


@o.options_of(o.running)
def command(
    prompt: Annotated[str | None, typer.Argument(help="The question to answer.")] = None,
    input: Annotated[
        Path | None, typer.Option("--input", help='JSONL of {"prompt": ...} lines.')
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="JSONL answers (with --input).")
    ] = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Chat with history.")
    ] = False,
    artifact: Annotated[
        Path | None,
        typer.Option(
            "--artifact",
            help="A memgen artifact directory: a weaver (with trigger), or a retrieval artifact "
            "(memgen baseline retrieval: the plain reasoner answers after its retrieved examples).",
        ),
    ] = None,
    retrieval: Annotated[
        Path | None,
        typer.Option(
            "--retrieval",
            help="A retrieval artifact whose examples go before each question, with the weaver "
            "of --artifact weaving memory on top.",
        ),
    ] = None,
    play: Annotated[
        str | None,
        typer.Option(
            "--play",
            help="Play one game of a game task (textworld:coin_collector, ...) and print the "
            "transcript: the game eval plays first with the same --seed and --task-option.",
        ),
    ] = None,
    task_option: o.TaskOption = None,
    base: o.Base = None,
    memory: o.Memory = "weaver",
    max_new_tokens: o.MaxNewTokens = 256,
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="Random seed (default 0); with --play also the game, as eval's --seed."
        ),
    ] = None,
    prompt_suffix: o.PromptSuffix = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Prompts per batch (--input).")
    ] = 8,
    json: o.Json = False,
    **running,
) -> None:
    """Answer with memory: inline ⟨mem K⟩ markers show where latents were woven."""
    gen = GenerationConfig(max_new_tokens, temperature, top_p, seed or 0, memory)
    stage.run(
        stage.GenerateOptions(
            prompt,
            input,
            output,
            interactive,
            base,
            artifact,
            prompt_suffix=prompt_suffix,
            batch_size=batch_size,
            json=json,
            gen=gen,
            retrieval=retrieval,
            play=play,
            task_options=task_option or [],
            play_seed=seed,
            **running,
        )
    )
