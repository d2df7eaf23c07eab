"""`memgen eval`: memory off vs weaver vs weaver + trigger (and LoRA and retrieval baselines)
on the same problems."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memgen_cli.commands import options as o
from memgen_cli.config import GenerationConfig
from memgen_cli.stages import evaluate as stage


@o.options_of(o.running)
def command(
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="Task(s): gsm8k, gsm_symbolic, gym:<name>, math, gpqa, triviaqa, "
            "kodcode, jsonl, or a GSM8K-format .jsonl path. Repeat or comma-separate.",
        ),
    ],
    artifact: Annotated[
        list[str] | None,
        typer.Option(
            "--artifact",
            help="Artifact(s) to compare: weavers (in the --memory modes), LoRA baselines "
            "(memgen baseline; run as the adapted reasoner, memory off) and retrieval artifacts "
            "(memgen baseline retrieval; the plain reasoner with retrieved examples). Repeat or "
            "comma-separate; every one runs on the same problems, and each row gets a paired "
            "figure against the first row of its task.",
        ),
    ] = None,
    retrieval: Annotated[
        Path | None,
        typer.Option(
            "--retrieval",
            help="A retrieval artifact (memgen baseline retrieval) whose examples also go before "
            "the questions of every weaver: each weaver runs again, in its modes, with them "
            "(rows labelled WEAVER+RETRIEVAL; memory woven on top of the examples).",
        ),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            "--memory",
            help="Modes to compare, comma-separated: off,weaver,full "
            "(default: off plus every mode the artifact supports).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="First N problems of each task.")
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Data split (default: the task's test split).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Problems per generation batch.")
    ] = 16,
    max_new_tokens: o.MaxNewTokens = 512,
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Data seed (gym tasks: default held out "
            "from training; fixed datasets: shuffle) and sampling seed.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Directory for metrics.json and predictions.jsonl (default: runs/eval/<time>).",
        ),
    ] = None,
    json: o.Json = False,
    prompt_suffix: o.PromptSuffix = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option",
            help="KEY=VALUE for the task "
            "(e.g. grader=numeric, columns.prompt=problem, path=file.jsonl). Repeatable. "
            "Merged over the options an artifact recorded for its own task, key by key.",
        ),
    ] = None,
    show: Annotated[
        int,
        typer.Option(
            "--show",
            min=0,
            help="After the table, the first N problems of each task with the gold answer and "
            "each row's answer, ✓ / ✗ (predictions.jsonl holds them all).",
        ),
    ] = 0,
    base: o.Base = None,
    **running,
) -> None:
    """Benchmark memory modes side by side: accuracy ± s.e., insertions, throughput."""
    gen = GenerationConfig(max_new_tokens, temperature, top_p, 0, "off")
    stage.run(
        stage.EvalOptions(
            data,
            [Path(a) for a in artifact or []] or None,
            base,
            memory,
            limit,
            split,
            batch_size,
            gen,
            seed,
            output,
            json,
            prompt_suffix,
            task_option or [],
            **running,
            show=show,
            retrieval=retrieval,
        )
    )
