"""``memgen baseline retrieval``: the retrieval-memory baseline (ExpeL-style experience
retrieval) the paper sets MemGen against, built from exactly the samples a weaver trains on.

The store holds the training samples of the recipe's ``data`` section as ``baseline sft`` and
``sft-weaver`` select them (``sft_run.load_examples``: size, held-out part, seed; samples longer
than ``data.max_length`` dropped by the same rule, ``sft_data.tokenize_samples``), each with its
worked solution, the SFT target. Never a held-out sample. At answer time ``memgen eval`` and
``memgen generate`` put the k entries most similar to a question before it as solved examples
(``retrieval/prompt.py``). Reads top to bottom:

1. validate: the settings and the output path, before any model loads;
2. build: the task's training samples, the reasoner, the store and its index (``retrieval/store``);
3. save: the artifact of kind ``retrieval`` (``retrieval/artifact.py``), written atomically.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from pathlib import Path

from rich.console import Console

from memgen_cli.config import DataConfig, MemoryConfig, dump_yaml
from memgen_cli.console import make_console
from memgen_cli.data import Example
from memgen_cli.errors import MemgenError, did_you_mean
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.outputs import check_output
from memgen_cli.retrieval import (
    METHODS,
    PROMPT_FORMAT,
    SIMILARITIES,
    Experience,
    build,
    save_retrieval,
)
from memgen_cli.retrieval.config import RetrievalConfig
from memgen_cli.stages import frame
from memgen_cli.stages.baseline import beside_weaver
from memgen_cli.training.sft_data import target_text, tokenize_samples
from memgen_cli.training.sft_run import load_examples


# ----------------------------------------------------------------------------- config
def resolve_config(
    recipe=None,
    overrides=None,
    *,
    k: int | None = None,
    similarity: str | None = None,
    method: str | None = None,
    **flags,
) -> RetrievalConfig:
    """Recipe, then ``--set``, then the command's flags (which win): ``k``, ``similarity``,
    ``method``, ``base``, ``data``, ``columns``, ``task_options``, ``output``. A weaver's
    recipe writes beside the weaver's output, as ``baseline-retrieval``."""
    cfg = frame.resolve_config(RetrievalConfig, recipe, overrides, **flags)
    given = {"k": k, "similarity": similarity, "method": method}
    settings = dataclasses.replace(
        cfg.retrieval, **{key: v for key, v in given.items() if v is not None}
    )
    cfg = dataclasses.replace(cfg, retrieval=settings)
    return beside_weaver(cfg, recipe, overrides, flags, output="baseline-retrieval")


def validate(cfg: RetrievalConfig) -> None:
    """Check what the dataclass types cannot, before anything loads."""
    r, d = cfg.retrieval, cfg.data
    if r.method not in METHODS:
        raise MemgenError(
            f'method "{r.method}" is unknown; use {", ".join(METHODS)} (--method or --set '
            "retrieval.method=...). AWM's induced workflows are not built: see "
            "docs/stages/baseline.md#retrieval." + did_you_mean(r.method, METHODS)
        )
    if isinstance(r.k, bool) or not isinstance(r.k, int) or r.k < 1:
        raise MemgenError(f"--k (retrieval.k) must be a whole number >= 1; got {r.k!r}.")
    if r.similarity not in SIMILARITIES:
        raise MemgenError(
            f'--similarity "{r.similarity}" is unknown; use {" or ".join(SIMILARITIES)}.'
            + did_you_mean(r.similarity, SIMILARITIES)
        )
    checks = [
        (d.max_length > 1, "data.max_length must be > 1"),
        (d.size is None or d.size >= 1, "data.size must be >= 1 (or null for all)"),
        (d.heldout >= 0, "data.heldout must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise MemgenError(message + ".")


# ------------------------------------------------------------------------------- data
def within_length(tok, examples: list[Example], d: DataConfig) -> tuple[list[Example], int]:
    """The examples SFT keeps (prompt + target + EOS within ``data.max_length``, by the SFT
    stages' own tokenisation), and how many it drops."""
    kept = [
        ex
        for ex in examples
        if tokenize_samples(tok, [ex], d.prompt_suffix, d.system, d.max_length)[0]
    ]
    return kept, len(examples) - len(kept)


def data_fields(cfg: RetrievalConfig, task, data_seed: int | None) -> dict:
    """What the store was drawn from, under the names ``memgen eval`` reads back (its held-out
    seed rule) and the training stages record."""
    d = cfg.data
    return {
        "task": task.name,
        "data": d.path or d.task,
        "split": d.split,
        "task_options": dict(d.options),
        "data_seed": data_seed,
        "eval_seed": task.eval_seed,
    }


# ------------------------------------------------------------------------------- run
def run(cfg: RetrievalConfig, console: Console | None = None, overwrite: bool = False) -> Path:
    """Build the store and its index and write the artifact to ``cfg.output``; its path."""
    # 1. validate
    validate(cfg)
    check_output(cfg.output, kind="artifact", overwrite=overwrite)
    console = console or make_console()
    m, d, r = cfg.model, cfg.data, cfg.retrieval
    task, train_examples, held_examples, data_seed = load_examples(cfg)

    # 2. build
    started = time.perf_counter()
    base = load_base(m.base, m.device, m.dtype, m.revision)
    tok = base.tokenizer
    kept, dropped = within_length(tok, train_examples, d)
    held, held_dropped = within_length(tok, held_examples, d)
    if not kept:
        raise MemgenError(
            f"All {dropped} training samples are longer than data.max_length={d.max_length} "
            "tokens; raise it with --set data.max_length=N."
        )
    experiences = [Experience(ex.id, ex.question, target_text(ex), ex.answer) for ex in kept]
    console.print(
        f"baseline retrieval: {len(kept)} samples from {task.name} ({dropped} dropped as longer "
        f"than {d.max_length} tokens), similarity {r.similarity}, k {r.k}"
    )
    model = MemGenModel(base.model, tok, MemoryConfig()).eval()  # reasoner passes, adapters off
    timings: dict[str, float] = {}
    retriever = build(model, experiences, r.similarity, r.center, timings)

    # 3. save
    summary = {
        "stage": "baseline-retrieval",
        "method": r.method,
        **data_fields(cfg, task, data_seed),
        "samples": len(kept),
        "dropped_too_long": dropped,
        "heldout_samples": len(held),
        "heldout_dropped_too_long": held_dropped,
        "store_s": round(timings["store_s"], 3),
        "index_s": round(timings["index_s"], 3),
        "wall_s": round(time.perf_counter() - started, 1),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    out = save_retrieval(
        retriever,
        base,
        cfg.output,
        settings={"method": r.method, "k": r.k, **index_settings(cfg, retriever)},
        prompt={"prompt_suffix": d.prompt_suffix, "system": d.system, "examples": PROMPT_FORMAT},
        training=summary,
        recipe_yaml=dump_yaml(cfg),
    )
    console.print(summary_table(summary, cfg, out))
    return out


def index_settings(cfg: RetrievalConfig, retriever) -> dict:
    """The manifest's record of how entries are compared: the embedding and the faiss index,
    or BM25's parameters."""
    if cfg.retrieval.similarity == "bm25":
        return {
            "bm25": {
                "library": f"bm25s {importlib.metadata.version('bm25s')}",
                "tokens": "the reasoner tokenizer's pieces of the question, lower-cased",
                **{key: getattr(retriever.index, key) for key in ("k1", "b", "method")},
            }
        }
    return {
        "embedding": {
            "pooling": "mean of the reasoner's last hidden states (adapters off) over the "
            "question's tokens, no chat template",
            "center": cfg.retrieval.center,
            "normalise": "L2",
            "dim": int(retriever.vectors.shape[1]),
        },
        "index": {
            "library": f"faiss-cpu {importlib.metadata.version('faiss-cpu')}",
            "type": "IndexFlatIP",
            "metric": "inner product of centred, L2-normalised vectors (cosine)",
        },
    }


def summary_table(s: dict, cfg: RetrievalConfig, out: Path):
    r = cfg.retrieval
    rows = [
        ("task", f"{s['task']} ({s['samples']} samples, {s['dropped_too_long']} dropped)"),
        ("method", f"{r.method}, k {r.k}, similarity {r.similarity}"),
        ("store (read and embed)", f"{s['store_s']:.2f} s"),
        ("index", f"{s['index_s']:.3f} s"),
        ("wall time", f"{s['wall_s']:.1f} s"),
    ]
    return frame.table(f"baseline retrieval → {out}", rows)
