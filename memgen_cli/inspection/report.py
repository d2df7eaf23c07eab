"""The report: JSON records (layout in docs/inspect-memory-schema.md), its figures, the rich
terminal view (the answer with numbered markers, then one table per insertion) and the files
written (PNGs, inspect.json, the HTML page)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memgen_cli.inspection import plots, probe
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
        "plots": {},
        "timings": dict.fromkeys(TIMINGS),
    }


def describe(tokenizer, vocab, ins, number, example, tokens, prompt_ids, top_k) -> dict:
    """An insertion's record with what needs only its latents and its place (nearest tokens,
    norms); the deeper probes are filled in by the caller."""
    ids, cos = probe.nearest_tokens(ins.latents, vocab, top_k)
    if ins.token_index == 0:
        before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    else:
        before = tokenizer.decode(tokens[: ins.token_index], skip_special_tokens=True)
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
        "num_latents": int(ins.latents.shape[0]),
        "nearest_tokens": nearest,
        "nearest_cosines": [[round(c, 4) for c in row] for row in cosines],
        "norms": [round(n, 4) for n in norms],
        "norm_percentiles": [round(p, 2) for p in pct],
        "logit_lens": None,
        "logit_lens_layers": None,
        "attention": None,
        "ablation": None,
        "cluster": None,
        "correct": None,
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


# ------------------------------------------------------------------------------ terminal
def show(token: str) -> str:
    """A token as code would write it, so spaces and newlines are visible."""
    return repr(token)


def marker(rec: dict) -> str:
    return f"⟨mem {rec['num_latents']} #{rec['id']}⟩"


def answer_text(example: dict, recs: list[dict]) -> Text:
    text = Text()
    for seg in example["segments"]:
        if "text" in seg:
            text.append(seg["text"])
        else:
            text.append(marker(recs[seg["insertion"]]), style="bold cyan")
    return text


def _why(rec: dict) -> str:
    p = "always" if rec["trigger_prob"] is None else f"{rec['trigger_prob']:.3f}"
    where = (
        "end of prompt" if rec["kind"] == "prompt" else f"after {rec['token_index']} answer tokens"
    )
    return f"#{rec['id']} {rec['kind']} · {where} · trigger {p}"


def _effect(rec: dict) -> str:
    parts = []
    if rec["attention"]:
        a = rec["attention"]
        parts.append(
            f"attention {a['mass']:.4f} (uniform {a['uniform']:.4f}, {a['following_tokens']} tokens)"
        )
    if rec["ablation"]:
        ab = rec["ablation"]
        change = "changed" if ab["answer_changed"] else "unchanged"
        parts.append(
            f"drop it: Δlog-prob {ab['delta_logprob']:+.3f}, answer {ab['answer_with']} → {ab['answer_without']} ({change})"
        )
    return " · ".join(parts)


def insertion_table(rec: dict) -> Table:
    table = Table(
        title=_why(rec),
        caption=_effect(rec) or None,
        title_justify="left",
        caption_justify="left",
        expand=False,
    )
    table.add_column("latent", justify="right")
    table.add_column("nearest tokens (cosine)")
    table.add_column("logit lens (p)")
    table.add_column("‖latent‖ (pct of tokens)", justify="right")
    if rec["attention"]:
        table.add_column("attn", justify="right")
    for j in range(rec["num_latents"]):
        near = "  ".join(
            f"{show(t)} {c:.2f}"
            for t, c in zip(rec["nearest_tokens"][j], rec["nearest_cosines"][j], strict=True)
        )
        lens = (
            "  ".join(f"{show(p['token'])} {p['prob']:.2f}" for p in rec["logit_lens"][j])
            if rec["logit_lens"]
            else "—"
        )
        row = [str(j), near, lens, f"{rec['norms'][j]:.3f} ({rec['norm_percentiles'][j]:.0f}%)"]
        if rec["attention"]:
            row.append(f"{rec['attention']['per_latent'][j]:.4f}")
        table.add_row(*row)
    return table


def cluster_table(report: dict) -> Table:
    cl = report["clusters"]
    n = len(report["insertions"])
    title = f"k-means over {n} insertions (k={cl['k']}, seed {cl['seed']})"
    table = Table(title=title, title_justify="left")
    for col in (
        "cluster",
        "n",
        "prompt/inf",
        "position (q25-q75)",
        "right/wrong",
        "centroid's nearest tokens",
    ):
        table.add_column(col)
    for s, near in zip(cl["stats"], cl["centroid_nearest_tokens"], strict=True):
        q = s["position_quartiles"]
        where = f"{q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})" if q else "—"
        tokens = " ".join(show(t["token"]) for t in near[:4])
        table.add_row(
            str(s["cluster"]),
            str(s["size"]),
            f"{s['prompt']}/{s['inference']}",
            where,
            f"{s['in_correct']}/{s['in_wrong']}",
            tokens,
        )
    return table


def print_terminal(console: Console, report: dict) -> None:
    recs = report["insertions"]
    if report["mode"] == "prompt":
        example = report["examples"][0]
        console.print(Text("question: ", style="bold") + Text(example["question"]))
        console.print(Text("answer:   ", style="bold") + answer_text(example, recs))
        console.print(
            Text(
                f"[memory {report['memory']}: {len(recs)} insertion{'s' * (len(recs) != 1)}; "
                f"attention weights from {report['attention_implementation']} attention, mean over layers and heads]",
                style="dim",
            )
        )
        for rec in recs:
            console.print(insertion_table(rec))
        for skip in report["skipped"]:
            console.print(
                Text(
                    f"skipped · after {skip['token_index']} answer tokens "
                    f"(…{skip['text_before'][-30:]!r}) · trigger {skip['trigger_prob']:.3f}",
                    style="dim",
                )
            )
    else:
        n = len(report["examples"])
        console.print(
            f"[bold]{report['task']}[/]: {n} answers, accuracy {100 * report['accuracy']:.1f}%, "
            f"{len(recs)} insertions ({sum(r['kind'] == 'inference' for r in recs)} inside answers)"
            + (
                f", {len(report['skipped'])} boundaries skipped by the trigger"
                * bool(report["skipped"])
            )
        )
    if report["clusters"] is not None:
        console.print(cluster_table(report))
    drop = report["drop_cluster"]
    if drop is not None:
        first = drop["first_run"]
        console.print(
            f"[bold]drop cluster {drop['cluster']}[/]: accuracy {100 * drop['accuracy_with']:.1f}% with it, "
            f"{100 * drop['accuracy_without']:.1f}% without ({drop['insertions_dropped']} of "
            f"{drop['insertions_seen']} insertions dropped, {drop['answers_changed']} answers changed). "
            f"On the first run the rule selects {first['rule_selects']} insertions, "
            f"{first['rule_selects_in_cluster']} of the cluster's {first['cluster_size']}."
        )
        if drop["warning"]:
            console.print(f"[yellow]warning:[/] {drop['warning']}")
    t = report["timings"]
    console.print(
        Text(
            "timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items() if v is not None),
            style="dim",
        )
    )


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
