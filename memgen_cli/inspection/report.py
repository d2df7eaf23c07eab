"""The report: JSON records (layout in docs/inspect-memory-schema.md), its figures and the files
written (PNGs, inspect.json, the HTML page). ``terminal.py`` prints it; ``views.py`` says what
each view shows for each ``memory.inject``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from memgen_cli.inspection import plots, probe
from memgen_cli.inspection.views import views
from memgen_cli.outputs import atomic_dir, write_output

TIMINGS = (
    "load_s",
    "generate_s",
    "probe_s",
    "ablation_s",
    "cluster_s",
    "intervention_s",
    "total_s",
)
CONTEXT_CHARS = 60  # how much text before an insertion the records keep


# ------------------------------------------------------------------------------- records
def new_report(version, opts, session, digest, memory, suffix, vocab) -> dict:
    """The report's top level, every key present from the start (see the schema doc)."""
    inject = "kv" if session.model.kv else "input"
    return {
        "schema_version": version,
        "mode": "prompt" if opts.prompt is not None else "data",
        "artifact": {
            "path": str(opts.artifact),
            "digest": digest,
            "kind": session.manifest.get("kind"),
        },
        "base": session.base.name,
        "memory": memory,
        "inject": inject,
        "views": views(inject),
        "generation": {
            "max_new_tokens": opts.max_new_tokens,
            "temperature": 0.0,
            "seed": opts.seed,
        },
        "prompt_suffix": suffix,
        "task": opts.data,
        "top_k": opts.top_k,
        "attention_implementation": None,
        "embedding_norms": probe.norm_summary(vocab),
        "accuracy": None,
        "examples": [],
        "insertions": [],
        "skipped": [],
        "clusters": None,
        "drop_cluster": None,
        "episodes": None,  # games: success rate, turns, what does not apply (inspect_episodes)
        "plots": {},
        "timings": dict.fromkeys(TIMINGS),
    }


def describe(tokenizer, vocab, ins, number, example, tokens, prompt_ids, top_k, kv=False) -> dict:
    """An insertion's record with what needs only its trace and its place (nearest tokens,
    norms); the deeper probes are filled in by the caller. ``kv``: nearest tokens of the
    weaver's final states at the slots, and no norms (``views``)."""
    ids, cos = probe.nearest_tokens(ins.weaver_states if kv else ins.latents, vocab, top_k)
    if ins.token_index == 0:
        before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    else:
        before = tokenizer.decode(tokens[: ins.token_index], skip_special_tokens=True)
    norms = pct = None
    if not kv:
        norms = torch.linalg.vector_norm(ins.latents.float(), dim=-1).tolist()
        pct = probe.norm_percentiles(ins.latents, vocab).tolist()
    return insertion_record(
        number,
        example,
        ins,
        len(tokens),
        before,
        [vocab.decode(r) for r in ids],
        cos.tolist(),
        norms,
        pct,
    )


def example_record(index, question, completion, num_tokens, finished, example_id=None) -> dict:
    return {
        "index": index,
        "id": example_id,
        "question": question,
        "completion": completion,
        "num_tokens": num_tokens,
        "finished": finished,
        "answer": None,
        "gold": None,
        "correct": None,
        "segments": [],
    }


def insertion_record(
    number, example, ins, num_tokens, before, nearest, cosines, norms, pct
) -> dict:
    return {
        "id": number,
        "example": example,
        "kind": ins.kind,
        "token_index": ins.token_index,
        "relative_position": round(ins.token_index / max(num_tokens, 1), 4),
        "text_before": before[-CONTEXT_CHARS:],
        "trigger_prob": ins.trigger_prob,
        "num_latents": int(ins.weaver_states.shape[0]),
        "nearest_tokens": nearest,
        "nearest_cosines": [[round(c, 4) for c in row] for row in cosines],
        "norms": None if norms is None else [round(n, 4) for n in norms],
        "norm_percentiles": None if pct is None else [round(p, 2) for p in pct],
        "logit_lens": None,
        "logit_lens_layers": None,
        "weaver_lens": None,
        "slot_norms": None,
        "attention": None,
        "ablation": None,
        "cluster": None,
        "correct": None,
        "turn": None,  # games: the turn it was woven in (0 = first)
    }


def skipped_records(tokenizer, trace, row: int, example: int, tokens) -> list[dict]:
    """The clause boundaries where a trained trigger decided not to weave (memory full)."""
    return [
        {
            "example": example,
            "token_index": skip.token_index,
            "text_before": tokenizer.decode(tokens[: skip.token_index], skip_special_tokens=True)[
                -CONTEXT_CHARS:
            ],
            "trigger_prob": round(skip.trigger_prob, 4),
        }
        for skip in sorted(trace.skips_for_row(row), key=lambda k: k.token_index)
    ]


def ablation_record(logp_with, logp_without, completion, other, answer, other_answer) -> dict:
    return {
        "logprob_with": round(logp_with, 4),
        "logprob_without": round(logp_without, 4),
        "delta_logprob": round(logp_without - logp_with, 4),
        "completion_without": other,
        "answer_with": answer,
        "answer_without": other_answer,
        "answer_changed": answer != other_answer,
        "completion_changed": completion != other,
        "zero_values": None,
    }


def zero_values_record(logp_with, logp_zeroed) -> dict:
    return {
        "logprob": round(logp_zeroed, 4),
        "delta_logprob": round(logp_zeroed - logp_with, 4),
    }


def answer_segments(pieces: list[tuple[str, str]], records: list[dict]) -> list[dict]:
    """``rendering.segments`` pieces with each marker replaced by its insertion id."""
    ids = iter(r["id"] for r in records)
    return [{"text": text} if kind == "text" else {"insertion": next(ids)} for kind, text in pieces]


# ------------------------------------------------------------------------------- figures
def figures(report: dict, vocab) -> dict[str, bytes]:
    """Every figure the report supports, as PNG bytes keyed by file stem."""
    recs = report["insertions"]
    out = {}
    if report["views"]["norms"]["applies"]:
        norms = [n for r in recs for n in r["norms"]]
        kinds = [r["kind"] for r in recs for _ in r["norms"]]
        out["latent_norms"] = plots.norms_plot(vocab.sorted_norms.numpy(), norms, kinds)
    if report["mode"] == "prompt":
        labels = [f"#{r['id']} {r['kind']} @{r['token_index']}" for r in recs]
        att = [r["attention"] or {} for r in recs]
        out["effects"] = plots.effects_plot(
            labels,
            [a.get("mass") for a in att],
            [a.get("uniform") for a in att],
            [r["ablation"]["delta_logprob"] for r in recs],
        )
    cl = report["clusters"]
    if cl is not None:
        import numpy as np

        labels = np.array([r["cluster"] for r in recs])
        kinds = [r["kind"] for r in recs]
        out["clusters_pca"] = plots.pca_plot(
            np.array(cl["points"]["pca"]), cl["pca_explained_variance"], labels, kinds
        )
        if cl["points"]["tsne"] is not None:
            out["clusters_tsne"] = plots.tsne_plot(
                np.array(cl["points"]["tsne"]), cl["tsne_perplexity"], labels, kinds
            )
        positions = [
            [r["relative_position"] for r in recs if r["cluster"] == s["cluster"]]
            for s in cl["stats"]
        ]
        out["cluster_stats"] = plots.cluster_stats_plot(cl["stats"], positions)
    return out


# --------------------------------------------------------------------------------- files
def write_outputs(report: dict, figures: dict[str, bytes], output, html, console: Console) -> None:
    """PNGs and inspect.json into the folder ``output``, the self-contained page to ``html``;
    each atomically (an interrupted run leaves the old output or the new one, never half)."""
    if output is not None:
        out = Path(output)
        with atomic_dir(out, "inspect-memory") as tmp:
            for name, png in figures.items():
                (tmp / f"{name}.png").write_bytes(png)
                report["plots"][name] = str(out / f"{name}.png")
            (tmp / "inspect.json").write_text(
                json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8"
            )
        console.print(f"wrote {len(figures)} plots and inspect.json to {out}", style="dim")
    if html is not None:
        from memgen_cli.inspection.html import page

        write_output(html, page(report, figures), kind="html")
        console.print(f"wrote {html}", style="dim")
