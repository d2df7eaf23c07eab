"""The rich terminal view of an inspect-memory report: the answer with numbered markers, one
table per insertion, the cluster table and the drop-cluster line."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memgen_cli.inspection.views import not_applicable


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


def _numbers(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _effect(rec: dict) -> str:
    lines = []
    if rec["attention"]:
        a = rec["attention"]
        lines.append(
            f"attention {a['mass']:.4f} (uniform {a['uniform']:.4f}, {a['following_tokens']} tokens); "
            f"per layer {_numbers(a['per_layer'])}"
        )
    if rec["slot_norms"]:
        n = rec["slot_norms"]
        lines.append(
            f"‖slot‖ / ‖token‖ per layer: keys {_numbers(n['key_ratio'])}; "
            f"values {_numbers(n['value_ratio'])}"
        )
    if rec["ablation"]:
        ab = rec["ablation"]
        change = "changed" if ab["answer_changed"] else "unchanged"
        line = f"drop it: Δlog-prob {ab['delta_logprob']:+.3f}, answer {ab['answer_with']} → {ab['answer_without']} ({change})"
        if ab["zero_values"]:
            line += f" · zero its values: Δlog-prob {ab['zero_values']['delta_logprob']:+.3f}"
        lines.append(line)
    return "\n".join(lines)


def _top(predictions: list[dict]) -> str:
    return "  ".join(f"{show(p['token'])} {p['prob']:.2f}" for p in predictions)


def insertion_table(rec: dict) -> Table:
    table = Table(
        title=_why(rec),
        caption=_effect(rec) or None,
        title_justify="left",
        caption_justify="left",
        expand=False,
    )
    kv = rec["weaver_lens"] is not None
    table.add_column("slot" if kv else "latent", justify="right")
    table.add_column("weaver state: nearest tokens (cosine)" if kv else "nearest tokens (cosine)")
    table.add_column("weaver state → LM head (p)" if kv else "logit lens (p)")
    if rec["norms"] is not None:
        table.add_column("‖latent‖ (pct of tokens)", justify="right")
    if rec["attention"]:
        table.add_column("attn", justify="right")
    lens = rec["weaver_lens"] if kv else rec["logit_lens"]
    for j in range(rec["num_latents"]):
        near = "  ".join(
            f"{show(t)} {c:.2f}"
            for t, c in zip(rec["nearest_tokens"][j], rec["nearest_cosines"][j], strict=True)
        )
        row = [str(j), near, _top(lens[j]) if lens else "—"]
        if rec["norms"] is not None:
            row.append(f"{rec['norms'][j]:.3f} ({rec['norm_percentiles'][j]:.0f}%)")
        if rec["attention"]:
            row.append(f"{rec['attention']['per_latent'][j]:.4f}")
        table.add_row(*row)
    return table


def cluster_table(report: dict) -> Table:
    cl = report["clusters"]
    n = len(report["insertions"])
    title = f"k-means over {n} insertions (k={cl['k']}, seed {cl['seed']})"
    table = Table(title=title, title_justify="left")
    games = report.get("episodes") is not None
    for col in (
        "cluster",
        "n",
        "prompt/inf",
        "turn in episode (q25-q75)" if games else "position (q25-q75)",
        "won/lost" if games else "right/wrong",
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
    for name, why in not_applicable(report):
        console.print(Text(f"not applicable with inject: kv: {name} ({why})", style="dim"))
    if report["mode"] == "prompt":
        example = report["examples"][0]
        console.print(Text("question: ", style="bold") + Text(example["question"]))
        console.print(Text("answer:   ", style="bold") + answer_text(example, recs))
        console.print(
            Text(
                f"[memory {report['memory']}, inject {report['inject']}: "
                f"{len(recs)} insertion{'s' * (len(recs) != 1)}; "
                f"attention weights from {report['attention_implementation']} attention, mean over heads; attn: mean over layers]",
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
    elif report["episodes"] is not None:  # games (stages/inspect_episodes.py)
        ep = report["episodes"]
        inside = sum(r["kind"] == "inference" for r in recs)
        console.print(
            f"[bold]{report['task']}[/]: {ep['games']} games, success "
            f"{100 * ep['success_rate']:.1f}%, {len(recs)} insertions: prompt latents at "
            f"{ep['woven_turns']} of {sum(ep['turns'])} turns, {inside} inside replies"
        )
        for name, why in ep["not_applicable"].items():
            console.print(Text(f"not applicable to episodes: {name} ({why})", style="dim"))
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
