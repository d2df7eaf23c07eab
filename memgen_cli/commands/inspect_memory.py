"""`memgen inspect-memory`: what the latent memory says, where it goes, and what it does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memgen_cli.commands import options as o
from memgen_cli.stages import inspect_memory as stage


@o.options_of(o.running)
def command(
    artifact: o.Artifact = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Inspect one answer to this question, in depth.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Inspect many answers: a task (gsm_symbolic, gym:NAME, ...) or a GSM8K-format .jsonl.",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Examples to answer with --data.")
    ] = 100,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Data split (default: the task's evaluation split)."),
    ] = None,
    task_option: o.TaskOption = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Nearest tokens per latent.")] = 5,
    clusters: Annotated[
        int | None,
        typer.Option(
            "--clusters", min=2, help="k-means clusters (default 4 with --data; off with --prompt)."
        ),
    ] = None,
    drop_cluster: Annotated[
        int | None,
        typer.Option(
            "--drop-cluster", min=0, help="Re-run --data with cluster J's insertions suppressed."
        ),
    ] = None,
    drop_rule: Annotated[
        str,
        typer.Option(
            "--drop-rule",
            help="Which insertions count as cluster J: paper (centroid J among the top-10 cosine "
            "neighbours of the mean latent, vocabulary ∪ centroids) | nearest (nearest centroid).",
        ),
    ] = "paper",
    layers: Annotated[
        bool, typer.Option("--layers", help="Logit lens at every layer, not only the last.")
    ] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")
    ] = None,
    json: o.Json = False,
    output: Annotated[
        Path | None, typer.Option("--output", help="Directory for PNG plots and inspect.json.")
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            "--memory",
            help="weaver | full (default: full when the artifact has a trained trigger).",
        ),
    ] = None,
    max_new_tokens: o.MaxNewTokens = 256,
    seed: o.Seed = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Answers per batch (--data).")
    ] = 8,
    prompt_suffix: o.PromptSuffix = None,
    base: o.Base = None,
    **running,
) -> None:
    """Look inside the memory: nearest tokens, logit lens, norms, attention, ablations, clusters
    (for a memory.inject kv weaver, the views that apply; it says which do not, and why)."""
    stage.run(
        stage.InspectOptions(
            artifact=artifact, prompt=prompt, data=data, limit=limit, split=split, top_k=top_k,
            clusters=clusters, drop_cluster=drop_cluster, drop_rule=drop_rule, layers=layers,
            html=html, json=json, output=output, memory=memory, max_new_tokens=max_new_tokens,
            seed=seed, batch_size=batch_size, prompt_suffix=prompt_suffix, base=base,
            task_options=task_option or [], **running,
        )
    )  # fmt: skip
