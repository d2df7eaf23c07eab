"""One self-contained HTML page for an inspect-memory report: no network, no external files.

CSS and JS are inline and figures are base64 PNGs. The answer shows a button per insertion;
clicking it reveals that insertion's details (nearest tokens, logit lens, norms, attention,
ablation) in the side panel. Views that do not apply to a ``memory.inject: kv`` memory are
listed under the header with the reason, instead of numbers. tests/test_inspect.py clicks every
marker in headless Chromium.
"""

from __future__ import annotations

import base64
from html import escape

from memgen_cli.inspection.views import not_applicable

CAPTIONS = {
    "latent_norms": "Latent norms (ticks) against the distribution of the reasoner's token-embedding norms.",
    "effects": "Left: mean attention that later answer tokens give to each insertion (all layers and "
    "heads; with inject kv, to its slot columns), against a uniform spread. Right: change in the "
    "answer's teacher-forced log-probability when that one insertion is removed.",
    "clusters_pca": "PCA of mean-pooled latents (inject kv: the weaver's final states at the slots), "
    "coloured by k-means cluster (left) and by kind (right).",
    "clusters_tsne": "t-SNE of mean-pooled latents (inject kv: the weaver's final states at the "
    "slots), coloured by k-means cluster (left) and by kind (right).",
    "cluster_stats": "Per cluster: relative position in the answer (left) and answer correctness (right).",
}

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:18px 28px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:21px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}
.meta{color:#555;font-size:13px;margin:0}
main{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px;padding:0 28px}
#panel{position:sticky;top:0;align-self:start;max-height:100vh;overflow:auto;padding-bottom:20px}
.answer{white-space:pre-wrap;background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px}
.question{color:#444;margin:6px 0}
button.marker{font:inherit;font-size:13px;color:#0b5cad;background:#e6f0fb;border:1px solid #9cc3ea;
 border-radius:4px;padding:0 4px;margin:0 2px;cursor:pointer}
button.marker.active{background:#0b5cad;color:#fff}
.insertion{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px}
.hint{color:#777}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e5e5e5;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
code{font:12px ui-monospace,Menlo,Consolas,monospace;white-space:pre;background:#f1f1f1;border-radius:3px;padding:0 3px}
.facts{margin:4px 0;padding-left:18px}
.good{color:#1a7f37}.bad{color:#b42318}
figure{margin:12px 0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
figure img{max-width:min(100%,1100px);height:auto}figcaption{font-size:13px;color:#555}
#figures{padding:0 28px 30px}
details summary{cursor:pointer}
"""

SCRIPT = """
function showInsertion(id){
  document.querySelectorAll('.insertion').forEach(function(d){d.hidden = d.id !== 'ins-' + id;});
  document.querySelectorAll('button.marker').forEach(function(b){
    b.classList.toggle('active', b.dataset.ins === String(id));});
  var hint = document.getElementById('hint'); if (hint) hint.hidden = true;
}
document.querySelectorAll('button.marker').forEach(function(b){
  b.addEventListener('click', function(){ showInsertion(b.dataset.ins); });});
"""


def _tok(token: str) -> str:
    return f"<code>{escape(repr(token))}</code>"


def _answer(example: dict, recs: list[dict]) -> str:
    parts = []
    for seg in example["segments"]:
        if "text" in seg:
            parts.append(escape(seg["text"]))
        else:
            rec = recs[seg["insertion"]]
            parts.append(
                f'<button class="marker" data-ins="{rec["id"]}" title="{escape(rec["kind"])} insertion '
                f'#{rec["id"]}: click for details">⟨mem {rec["num_latents"]}⟩<sub>#{rec["id"]}</sub></button>'
            )
    return "".join(parts)


def _examples(report: dict) -> str:
    recs, out = report["insertions"], []
    for n, ex in enumerate(report["examples"]):
        body = f'<p class="question"><b>Q:</b> {escape(ex["question"])}</p><div class="answer">{_answer(ex, recs)}</div>'
        if report["mode"] == "prompt":
            out.append(body)
            continue
        mark = "✓" if (ex["correct"] or 0) >= 1 else "✗"
        count = sum(1 for s in ex["segments"] if "insertion" in s)
        summary = (
            f"{mark} {escape(str(ex['id']))}: answer {escape(str(ex['answer']))}, gold "
            f"{escape(str(ex['gold']))}, {count} insertions"
        )
        out.append(
            f"<details{' open' if n == 0 else ''}><summary>{summary}</summary>{body}</details>"
        )
    return "\n".join(out)


def _facts(rec: dict) -> str:
    p = (
        "always (untrained trigger or prompt)"
        if rec["trigger_prob"] is None
        else f"{rec['trigger_prob']:.3f}"
    )
    items = [
        f"kind <b>{escape(rec['kind'])}</b>, after {rec['token_index']} answer tokens "
        f"(relative position {rec['relative_position']:.2f})",
        f"text before: <code>…{escape(rec['text_before']).replace(chr(10), '⏎')}</code>",
        f"trigger probability: {p}",
    ]
    if rec["cluster"] is not None:
        items.append(f"cluster <b>{rec['cluster']}</b>")
    if rec["correct"] is not None:
        items.append("in a correct answer" if rec["correct"] >= 1 else "in a wrong answer")
    att = rec["attention"]
    if att:
        per_layer = " · ".join(f"{v:.4f}" for v in att["per_layer"])
        items.append(
            f"attention from the {att['following_tokens']} later answer tokens: <b>{att['mass']:.4f}</b> "
            f"(uniform spread would give {att['uniform']:.4f}); per layer {per_layer}"
        )
    norms = rec["slot_norms"]
    if norms:
        keys = " · ".join(f"{v:.3f}" for v in norms["key_ratio"])
        values = " · ".join(f"{v:.3f}" for v in norms["value_ratio"])
        items.append(f"‖slot‖ / ‖token‖ per layer: keys {keys}; values {values}")
    ab = rec["ablation"]
    if ab:
        cls = "bad" if ab["answer_changed"] else "good"
        items.append(
            f"drop it: Δ log-prob of this answer <b>{ab['delta_logprob']:+.3f}</b> "
            f"({ab['logprob_with']:.2f} → {ab['logprob_without']:.2f}); regenerated answer "
            f"<span class='{cls}'>{escape(str(ab['answer_with']))} → {escape(str(ab['answer_without']))}"
            f" ({'changed' if ab['answer_changed'] else 'unchanged'})</span>"
            f"<details><summary>completion without it</summary><div class='answer'>"
            f"{escape(ab['completion_without'])}</div></details>"
        )
        if ab["zero_values"]:
            zero = ab["zero_values"]
            items.append(
                f"zero its values at every layer: Δ log-prob <b>{zero['delta_logprob']:+.3f}</b> "
                f"({ab['logprob_with']:.2f} → {zero['logprob']:.2f})"
            )
    return '<ul class="facts">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _latent_table(rec: dict) -> str:
    att, norms, kv = rec["attention"], rec["norms"] is not None, rec["weaver_lens"] is not None
    lens = rec["weaver_lens"] if kv else rec["logit_lens"]
    if kv:
        cols = ["slot", "weaver state: nearest tokens (cosine)", "weaver state → LM head (p)"]
    else:
        cols = ["latent", "nearest tokens (cosine)"] + (["logit lens (p)"] if lens else [])
    cols += (["‖latent‖ (percentile)"] if norms else []) + (["attention"] if att else [])
    rows = []
    for j in range(rec["num_latents"]):
        pairs = zip(rec["nearest_tokens"][j], rec["nearest_cosines"][j], strict=True)
        cells = [str(j), " ".join(f"{_tok(t)} {c:.2f}" for t, c in pairs)]
        if lens:
            cells.append(" ".join(f"{_tok(p['token'])} {p['prob']:.2f}" for p in lens[j]))
        if norms:
            cells.append(f"{rec['norms'][j]:.3f} ({rec['norm_percentiles'][j]:.0f}%)")
        if att:
            cells.append(f"{att['per_latent'][j]:.4f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _layers_table(rec: dict) -> str:
    layers = rec["logit_lens_layers"]
    if not layers:
        return ""
    head = (
        "<tr><th>layer</th>"
        + "".join(f"<th>latent {j}</th>" for j in range(rec["num_latents"]))
        + "</tr>"
    )
    rows = "".join(
        f"<tr><td>{n + 1}</td>"
        + "".join(f"<td>{_tok(p['token'])} {p['prob']:.2f}</td>" for p in layer)
        + "</tr>"
        for n, layer in enumerate(layers)
    )
    return f"<details><summary>logit lens per layer (final norm applied)</summary><table>{head}{rows}</table></details>"


def _insertions(report: dict) -> str:
    return "\n".join(
        f'<div class="insertion" id="ins-{r["id"]}" hidden><h3>Insertion #{r["id"]} (answer {r["example"]})</h3>'
        f"{_facts(r)}{_latent_table(r)}{_layers_table(r)}</div>"
        for r in report["insertions"]
    )


def _clusters(report: dict) -> str:
    cl, drop = report["clusters"], report["drop_cluster"]
    if cl is None:
        return ""
    rows = []
    for s, near in zip(cl["stats"], cl["centroid_nearest_tokens"], strict=True):
        q = (
            " · ".join(f"{v:.2f}" for v in s["position_quartiles"])
            if s["position_quartiles"]
            else "—"
        )
        tokens = " ".join(f"{_tok(t['token'])} {t['cosine']:.2f}" for t in near)
        rows.append(
            f"<tr><td>{s['cluster']}</td><td>{s['size']}</td><td>{s['prompt']} / {s['inference']}</td>"
            f"<td>{q}</td><td>{s['in_correct']} / {s['in_wrong']}</td><td>{tokens}</td></tr>"
        )
    html = (
        f"<h2>Clusters</h2><p class='meta'>{escape(cl['method'])}; k={cl['k']}, seed {cl['seed']}.</p>"
        "<table><tr><th>cluster</th><th>size</th><th>prompt / inference</th><th>position q25 · q50 · q75</th>"
        f"<th>in correct / wrong answers</th><th>nearest tokens of the centroid</th></tr>{''.join(rows)}</table>"
    )
    if drop is not None:
        html += (
            f"<p><b>Drop cluster {drop['cluster']}</b>: accuracy {100 * drop['accuracy_with']:.1f}% with it, "
            f"{100 * drop['accuracy_without']:.1f}% without ({drop['insertions_dropped']} of "
            f"{drop['insertions_seen']} insertions dropped; rule: {escape(drop['rule'])}). "
            f"On the first run the rule selects {drop['first_run']['rule_selects']} insertions, "
            f"{drop['first_run']['rule_selects_in_cluster']} of the cluster's "
            f"{drop['first_run']['cluster_size']}.</p>"
        )
        if drop["warning"]:
            html += f"<p class='bad'><b>Warning:</b> {escape(drop['warning'])}</p>"
    return html


def _figures(figures: dict[str, bytes]) -> str:
    return "\n".join(
        f'<figure id="fig-{name}"><img alt="{escape(CAPTIONS.get(name, name))}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>'
        f"{escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, png in figures.items()
    )


def _not_applicable(report: dict) -> str:
    """The views that do not apply to this memory, each with why (kv reports only)."""
    items = "".join(
        f"<li><b>{escape(name)}</b>: {escape(why)}</li>" for name, why in not_applicable(report)
    )
    if not items:
        return ""
    return f'<div id="not-applicable" class="meta"><b>Not applicable with inject: kv</b><ul class="facts">{items}</ul></div>'


def page(report: dict, figures: dict[str, bytes]) -> str:
    """The whole page as one string."""
    n = len(report["insertions"])
    meta = (
        f"artifact <code>{escape(report['artifact']['path'])}</code> · base {escape(report['base'])} · "
        f"memory {escape(report['memory'])} · inject {escape(report['inject'])} · {n} insertions · greedy, at most "
        f"{report['generation']['max_new_tokens']} tokens"
    )
    if report["attention_implementation"]:
        meta += f" · attention weights from {escape(report['attention_implementation'])} attention"
    if report["accuracy"] is not None:
        meta += f" · task {escape(str(report['task']))}, accuracy {100 * report['accuracy']:.1f}%"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>memgen inspect-memory</title><style>{CSS}</style></head>
<body><header><h1>Latent memory inspection</h1><p class="meta">{meta}</p>{_not_applicable(report)}</header>
<main><section id="answers"><h2>Answer{"s" if report["mode"] == "data" else ""} (click a ⟨mem⟩ marker)</h2>
{_examples(report)}</section>
<aside id="panel"><h2>Insertion details</h2><p id="hint" class="hint">Click a ⟨mem K⟩ marker in the answer to see
what its K latents say (nearest tokens, logit lens), how big they are, and what they do.</p>
{_insertions(report)}</aside></main>
<section id="figures">{_clusters(report)}<h2>Figures</h2>{_figures(figures)}</section>
<script>{SCRIPT}</script></body></html>
"""
