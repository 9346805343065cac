"""Every metric of the project, numpy only: training's validation, `eval`, the report and the
benchmarks all measure through here, so one figure means one thing everywhere.

Classification: `accuracy`, `nearest_center`. Embedding geometry: `intra_inter_ratio`.
Retrieval: `retrieval_metrics` (precision@1, MAP@R). Unknown detection: `auroc`,
`fpr_at_tpr`, `flagged_shares`. Arrays are (N, D) embeddings, (N,) labels, (C, D) centers.
"""

from __future__ import annotations

import numpy as np

from center_embed.contract import squared_distances

# --------------------------------------------------------------------------- classification


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of `predicted` equal to `labels`; NaN for no images."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return float((predicted == labels).mean()) if len(labels) else float("nan")


def nearest_center(embeddings: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(N,) index of the nearest center by squared Euclidean distance."""
    return squared_distances(embeddings, centers).argmin(1)


def intra_inter_ratio(embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> float:
    """Mean Euclidean distance of an image to its own center over the mean distance between
    centers. Small is good: classes are tight relative to how far apart they sit. Only the
    classes present in `labels` take part in the denominator."""
    x = np.asarray(embeddings, np.float64)
    c = np.asarray(centers, np.float64)
    labels = np.asarray(labels)
    present = c[np.unique(labels)]
    if len(present) < 2:
        return float("nan")
    intra = np.linalg.norm(x - c[labels], axis=1).mean()
    pair = np.sqrt(np.maximum(squared_distances(present, present).astype(np.float64), 0))
    np.fill_diagonal(pair, 0.0)  # the matmul form leaves a rounding residue on it
    k = len(present)
    inter = pair.sum() / (k * (k - 1))
    return float(intra / max(inter, 1e-12))


# --------------------------------------------------------------------------- retrieval


def retrieval_metrics(
    embeddings: np.ndarray, labels: np.ndarray, chunk: int = 512
) -> dict[str, float]:
    """Leave-one-out precision@1 and MAP@R (Musgrave et al. 2020): for each query the rest
    of the set is ranked by Euclidean distance; R = the other images of its class, and
    AP@R = (1/R)·Σ_{k≤R} P@k·rel(k). Queries whose class has no other image are skipped.

    Every distance kind a model may declare ranks one query's neighbours in this order
    (‖e − x‖² − ‖e‖² differs from ‖e − x‖² by a constant per query), so one ranking serves
    them all."""
    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    r_all = np.bincount(labels)[labels] - 1 if n else np.zeros(0, np.int64)
    k = min(max(int(r_all.max(initial=0)), 1), max(n - 1, 1))
    hits_at_1 = ap_sum = 0.0
    counted = 0
    for start in range(0, n, chunk):
        q = np.arange(start, min(start + chunk, n))
        d = squared_distances(embeddings[q], embeddings)  # (b, N)
        d[np.arange(len(q)), q] = np.inf
        nearest = _smallest(d, k)  # (b, k), nearest first
        relevant = labels[nearest] == labels[q, None]  # (b, k)
        r = r_all[q]
        ranks = np.arange(1, k + 1)
        precision = np.cumsum(relevant, 1) / ranks
        ap = (precision * relevant * (ranks[None, :] <= r[:, None])).sum(1) / np.maximum(r, 1)
        valid = r > 0
        hits_at_1 += float(relevant[valid, 0].sum())
        ap_sum += float(ap[valid].sum())
        counted += int(valid.sum())
    if not counted:
        return {"precision_at_1": float("nan"), "map_at_r": float("nan")}
    return {"precision_at_1": hits_at_1 / counted, "map_at_r": ap_sum / counted}


def _smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest values, in increasing order; ties by index.
    A partition first, so a row costs O(N + k log k) rather than a full sort."""
    if k < d.shape[1]:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(d.shape[1]), d.shape)
    values = np.take_along_axis(d, part, 1)
    order = np.lexsort((part, values), axis=1)  # by value, then by index
    return np.take_along_axis(part, order, 1)


# --------------------------------------------------------------------------- unknown detection


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown image > score of a known one), ties half; higher = further.
    The Mann-Whitney U statistic over the two sets' sizes."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if not len(known) or not len(unknown):
        raise ValueError("auroc needs at least one known and one unknown score")
    both = np.concatenate([known, unknown])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), np.float64)
    ranks[order] = np.arange(1, len(both) + 1)
    # Tied scores share the mean of their ranks.
    sorted_scores = both[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2
    u = ranks[len(known) :].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Share of unknown images scoring at or below the threshold that accepts `tpr` of the
    known images (the FPR95 of the OOD literature, knowns as positives)."""
    threshold = np.quantile(np.asarray(known, np.float64), tpr, method="inverted_cdf")
    return float((np.asarray(unknown) <= threshold).mean())


def flagged_shares(
    unknown: np.ndarray, labels: np.ndarray, correct: np.ndarray, class_names: list[str]
) -> dict[str, object]:
    """Share of correctly classified images flagged unknown, overall and per true class."""
    per_class = {}
    for j, name in enumerate(class_names):
        mine = correct & (labels == j)
        per_class[name] = float(unknown[mine].mean()) if mine.any() else None
    return {
        "all_images": float(unknown.mean()),
        "correct_images": float(unknown[correct].mean()) if correct.any() else None,
        "per_class_correct": per_class,
    }
