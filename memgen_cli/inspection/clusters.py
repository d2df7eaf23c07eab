"""Many insertions at once: mean-pool, k-means, 2-D projections, per-cluster statistics,
and the paper's drop-cluster rule.

All randomness is seeded (k-means and t-SNE take ``random_state=seed``), so the same
insertions and seed give the same clusters and the same pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from memgen_cli.inspection.probe import Vocab, nearest_tokens

DROP_TOP = 10  # paper: a centroid among the top-10 cosine neighbours of the mean latent


def mean_pool(latents: list[torch.Tensor]) -> np.ndarray:
    """One vector per insertion: the mean of its K latents. (N, D) float64."""
    return torch.stack([x.float().mean(0) for x in latents]).double().numpy()


@dataclass
class Clustering:
    labels: np.ndarray  # (N,) cluster of each insertion
    centroids: np.ndarray  # (k, D)
    inertia: float


def kmeans(points: np.ndarray, k: int, seed: int) -> Clustering:
    """k-means (k-means++ init, 10 restarts, seeded); clusters renumbered by size, largest 0."""
    from sklearn.cluster import KMeans

    fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
    sizes = np.bincount(fit.labels_, minlength=k)
    order = np.argsort(-sizes, kind="stable")  # old label of new cluster j
    rename = np.empty(k, dtype=int)
    rename[order] = np.arange(k)
    return Clustering(rename[fit.labels_], fit.cluster_centers_[order], float(fit.inertia_))


@dataclass
class Projection:
    pca: np.ndarray  # (N, 2)
    explained: list[float]  # variance share of the two principal components
    tsne: np.ndarray | None  # (N, 2), None when there are too few points
    perplexity: float | None


def project(points: np.ndarray, seed: int) -> Projection:
    """PCA to 2-D, and t-SNE (perplexity min(30, (N-1)/3)) when there are at least 5 points."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = points.shape[0]
    comps = min(2, n, points.shape[1])
    pca = PCA(n_components=comps, random_state=seed).fit(points)
    flat = np.zeros((n, 2))
    flat[:, :comps] = pca.transform(points)
    explained = [float(v) for v in pca.explained_variance_ratio_] + [0.0] * (2 - comps)
    if n < 5:
        return Projection(flat, explained, None, None)
    perplexity = float(min(30.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return Projection(flat, explained, tsne.fit_transform(points), perplexity)


def centroid_tokens(centroids: np.ndarray, vocab: Vocab, k: int) -> list[list[dict]]:
    ids, cos = nearest_tokens(torch.from_numpy(centroids).float(), vocab, k)
    return [
        [
            {"token": vocab.tokens[int(i)], "cosine": round(float(c), 4)}
            for i, c in zip(row_i, row_c, strict=True)
        ]
        for row_i, row_c in zip(ids, cos, strict=True)
    ]


DROP_RULES = ("paper", "nearest")


def drop_rule(
    centroids: np.ndarray, vocab: Vocab, cluster: int, rule: str = "paper", top: int = DROP_TOP
) -> Callable[[torch.Tensor], bool]:
    """``in_cluster(latents) -> bool``: does an insertion belong to ``cluster``?

    ``paper``: the paper's intervention test: the mean latent's top-``top`` cosine neighbours
    among vocabulary embeddings ∪ centroids include centroid ``cluster``. When latents lie far
    from every token (cosine ~0.2 is common) all k <= ``top`` centroids are among the
    neighbours of every latent, and the rule selects everything. ``nearest``: the centroid
    nearest to the mean latent (Euclidean, as k-means assigns) is ``cluster``.
    """
    cents = torch.from_numpy(centroids).float()
    if rule == "nearest":
        return lambda latents: (
            int(torch.cdist(latents.float().mean(0)[None], cents).argmin()) == cluster
        )
    cents = cents / torch.linalg.vector_norm(cents, dim=-1, keepdim=True).clamp_min(1e-12)
    table = torch.cat([vocab.unit, cents])
    target = vocab.unit.shape[0] + cluster

    def in_cluster(latents: torch.Tensor) -> bool:
        mean = latents.float().mean(0)
        cos = table @ (mean / torch.linalg.vector_norm(mean).clamp_min(1e-12))
        return bool((cos.topk(min(top, cos.numel())).indices == target).any())

    return in_cluster


def rule_text(rule: str, cluster: int) -> str:
    if rule == "nearest":
        return (
            f"drop an insertion when its mean latent is nearest to centroid {cluster} (Euclidean)"
        )
    return (
        f"drop an insertion when centroid {cluster} is among the top-{DROP_TOP} cosine neighbours "
        "of its mean latent among vocabulary embeddings ∪ centroids (paper)"
    )


def cluster_stats(labels: np.ndarray, records: list[dict], k: int) -> list[dict]:
    """Per cluster: size, kinds, where in the answer, and how often in correct answers.

    ``records[i]`` holds the insertion's ``kind``, ``relative_position`` (0 = start of the
    answer, 1 = end) and ``correct`` (its answer's grade, or None when ungraded).
    """
    stats = []
    for j in range(k):
        members = [r for r, label in zip(records, labels, strict=True) if label == j]
        positions = np.array([r["relative_position"] for r in members], dtype=float)
        graded = [r["correct"] for r in members if r["correct"] is not None]
        quart = (
            np.quantile(positions, [0.25, 0.5, 0.75]).round(4).tolist() if len(positions) else None
        )
        stats.append(
            {
                "cluster": j,
                "size": len(members),
                "prompt": sum(r["kind"] == "prompt" for r in members),
                "inference": sum(r["kind"] == "inference" for r in members),
                "position_quartiles": quart,
                "mean_position": round(float(positions.mean()), 4) if len(positions) else None,
                "in_correct": sum(1 for g in graded if g >= 1.0),
                "in_wrong": sum(1 for g in graded if g < 1.0),
                "share_correct": round(float(np.mean([g >= 1.0 for g in graded])), 4)
                if graded
                else None,
            }
        )
    return stats
