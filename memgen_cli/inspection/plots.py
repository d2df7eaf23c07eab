"""Figures for inspect-memory, rendered to PNG bytes (Agg backend: no display needed).

Each function takes plain data and returns PNG bytes; the stage writes them to ``--output``
and the HTML page embeds the same bytes, so the page and the files always agree.
"""

from __future__ import annotations

import io

import numpy as np

KIND_STYLE = {"prompt": ("s", "#d62728"), "inference": ("o", "#1f77b4")}
DPI = 150


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.dpi": DPI,
        }
    )
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def norms_plot(vocab_norms: np.ndarray, latent_norms: list[float], kinds: list[str]) -> bytes:
    """Histogram of token-embedding norms with every latent's norm as a tick below it."""
    # Legend handles must not inherit the faint alpha of a crowded strip.
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(
        vocab_norms,
        bins=80,
        color="#9e9e9e",
        alpha=0.8,
        density=True,
        label=f"token embeddings (n={len(vocab_norms):,})",
    )
    top = ax.get_ylim()[1]
    jitter = np.random.default_rng(0)
    for row, (kind, (_, colour)) in enumerate(KIND_STYLE.items()):
        xs = np.array([n for n, k in zip(latent_norms, kinds, strict=True) if k == kind])
        if len(xs):  # one jittered strip per kind below the histogram; faint when crowded
            ys = -(0.05 + 0.07 * row) * top + jitter.uniform(-0.02, 0.02, len(xs)) * top
            ax.scatter(
                xs,
                ys,
                marker="|",
                s=40,
                color=colour,
                alpha=min(1.0, 0.1 + 40 / len(xs)),
                label=f"{kind} latents (n={len(xs)})",
                clip_on=False,
            )
    for q, style in ((1, ":"), (50, "--"), (99, ":")):
        ax.axvline(np.percentile(vocab_norms, q), color="#555555", ls=style, lw=0.8)
    ax.set_ylim(-0.16 * top, top)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= top])  # no density below zero
    ax.set_xlabel("L2 norm (dotted: 1st/99th percentile of tokens; dashed: median)")
    ax.set_ylabel("density")
    ax.set_title("Latent norms against the reasoner's token-embedding norms")
    legend = ax.legend(frameon=False, fontsize=8, loc="upper right")
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    return _png(fig)


def effects_plot(
    labels: list[str], mass: list[float | None], uniform: list[float | None], delta: list[float]
) -> bytes:
    """Per insertion: attention mass vs. the uniform baseline, and the ablation's Δ log-prob."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    x = np.arange(len(labels))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(labels) + 5), 4.2))
    nan = lambda vs: [np.nan if v is None else v for v in vs]  # noqa: E731
    a.bar(x - 0.2, nan(mass), 0.4, color="#1f77b4", label="attention mass")
    a.bar(x + 0.2, nan(uniform), 0.4, color="#c7c7c7", label="uniform spread")
    a.set_ylabel("attention from later answer tokens\n(mean over layers and heads)")
    a.set_title("Attention paid to each insertion")
    a.legend(frameon=False, fontsize=8)
    b.bar(x, delta, 0.6, color=["#2ca02c" if d >= 0 else "#d62728" for d in delta])
    b.axhline(0, color="black", lw=0.8)
    b.set_ylabel("Δ log-prob of the answer\n(teacher-forced, without − with)")
    b.set_title("Effect of dropping each insertion")
    b.legend(
        handles=[
            Patch(color="#d62728", label="answer less likely without it"),
            Patch(color="#2ca02c", label="answer more likely without it"),
        ],
        frameon=False,
        fontsize=8,
    )
    for ax in (a, b):
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("insertion (#id kind @ answer tokens before it)")
    fig.tight_layout(w_pad=3)
    return _png(fig)


def _scatter_pair(
    plt, points: np.ndarray, labels: np.ndarray, kinds: list[str], axis: str, title: str
):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True, sharey=True)
    cmap = plt.get_cmap("tab10")
    for j in range(int(labels.max()) + 1):
        sel = labels == j
        a.scatter(
            points[sel, 0],
            points[sel, 1],
            s=18,
            color=cmap(j % 10),
            alpha=0.8,
            label=f"cluster {j} (n={int(sel.sum())})",
            edgecolors="none",
        )
    for kind, (marker, colour) in KIND_STYLE.items():
        sel = np.array([k == kind for k in kinds])
        if sel.any():
            b.scatter(
                points[sel, 0],
                points[sel, 1],
                s=18,
                marker=marker,
                color=colour,
                alpha=0.7,
                label=f"{kind} (n={int(sel.sum())})",
                edgecolors="none",
            )
    a.set_title(f"{title}, coloured by k-means cluster")
    b.set_title(f"{title}, coloured by insertion kind")
    for ax in (a, b):
        ax.set_xlabel(f"{axis} 1")
        ax.legend(frameon=False, fontsize=8, loc="best")
    a.set_ylabel(f"{axis} 2")
    fig.tight_layout()
    return fig


def pca_plot(
    points: np.ndarray, explained: list[float], labels: np.ndarray, kinds: list[str]
) -> bytes:
    plt = _pyplot()
    fig = _scatter_pair(plt, points, labels, kinds, "PC", "PCA of mean-pooled latents")
    for ax in fig.axes:
        ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
    fig.axes[0].set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    return _png(fig)


def tsne_plot(points: np.ndarray, perplexity: float, labels: np.ndarray, kinds: list[str]) -> bytes:
    plt = _pyplot()
    fig = _scatter_pair(plt, points, labels, kinds, "t-SNE", f"t-SNE (perplexity {perplexity:.0f})")
    return _png(fig)


def cluster_stats_plot(stats: list[dict], positions: list[list[float]]) -> bytes:
    """Where in the answer each cluster occurs, and in how many correct vs. wrong answers."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [f"cluster {s['cluster']}\n(n={s['size']})" for s in stats]
    boxes = a.boxplot([p if p else [np.nan] for p in positions], patch_artist=True, widths=0.6)
    cmap = plt.get_cmap("tab10")
    for j, box in enumerate(boxes["boxes"]):  # the same colours as the scatter plots
        box.set(facecolor=cmap(j % 10), alpha=0.6)
    for median in boxes["medians"]:
        median.set(color="black")
    a.set_xticks(np.arange(1, len(stats) + 1), names)
    a.set_ylabel("relative position in the answer\n(0 = first token, 1 = last)")
    a.set_title("Where each cluster's insertions occur")
    x = np.arange(len(stats))
    right = np.array([s["in_correct"] for s in stats])
    wrong = np.array([s["in_wrong"] for s in stats])
    b.bar(x, right, 0.6, color="#2ca02c", label="in correct answers")
    b.bar(x, wrong, 0.6, bottom=right, color="#d62728", label="in wrong answers")
    b.set_xticks(x, names)
    b.set_ylabel("insertions")
    b.set_title("Insertions per cluster, by answer correctness")
    b.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _png(fig)
