"""`memgen baseline retrieval`: the experience-retrieval baseline (a store, no training);
registered in the ``baseline`` group (``commands/baseline.py``)."""

from __future__ import annotations

from pathlib import Path

from memgen_cli.commands import options as o
from memgen_cli.console import make_console
from memgen_cli.evaluation.plan import parse_task_options
from memgen_cli.stages import retrieval as stage

SHORT_HELP = "An experience store of the weaver's training samples, retrieved as worked examples."

Recipe = o.option(
    Path,
    "--recipe",
    "Recipe YAML: a weaver's sft-weaver.yaml as it stands (the store is its data section's "
    "training samples, written beside the weaver's output as baseline-retrieval), or a "
    "RetrievalConfig.",
)
K = o.option(int, "--k", "Worked examples put before each question (retrieval.k; default 2).")
Similarity = o.option(
    str,
    "--similarity",
    "embed (the reasoner's mean-pooled hidden states, faiss; default) | bm25 (bm25s over the "
    "reasoner's tokens).",
)
Method = o.option(
    str, "--method", "expel (default, the only one): retrieve solved problems (ExpeL)."
)
TaskOption = o.option(
    list[str], "--task-option", "A task option KEY=VALUE (repeatable), as the weaver takes it."
)


def command(
    recipe: Recipe = None,
    set_: o.Set = None,
    k: K = None,
    similarity: Similarity = None,
    method: Method = None,
    base: o.Base = None,
    data: o.SFTData = None,
    columns: o.Columns = None,
    task_option: TaskOption = None,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
) -> None:
    """Build the retrieval baseline: every training sample of the recipe (the samples sft-weaver
    and baseline sft train on, held-out ones excluded) with its worked solution, indexed by its
    question. `memgen eval --artifact DIR` and `memgen generate --artifact DIR` then put the k
    most similar entries before each question as solved examples (chat turns); `eval --artifact
    WEAVER --retrieval DIR` weaves memory on top of them. The artifact (kind retrieval) holds
    store.jsonl, a faiss index (or bm25/) and the embeddings."""
    cfg = stage.resolve_config(
        recipe,
        set_,
        k=k,
        similarity=similarity,
        method=method,
        base=base,
        data=data,
        columns=o.parse_columns(columns),
        task_options=parse_task_options(task_option or []),
        output=output,
    )
    stage.run(cfg, console=make_console(), overwrite=overwrite)
