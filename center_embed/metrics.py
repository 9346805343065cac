"""Embedding metrics, each a short function over (N, D) embeddings and (N,) labels.

Distances are Euclidean unless a name says squared.
"""

from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """‖x − c‖² for every pair, as ‖x‖² − 2·x·cᵀ + ‖c‖² clamped at 0: (N, C)."""
    x, centers = x.float(), centers.float()
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ centers.T + centers.pow(2).sum(1)[None, :]
    return d.clamp_min_(0)


def nearest_center(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return squared_distances(x, centers).argmin(1)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).float().mean()) if len(labels) else float("nan")


def intra_inter_ratio(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> float:
    """Mean distance of a sample to its own center over mean distance between centers.

    Small is good: classes are tight relative to how far apart they sit. Only classes
    present in `labels` take part in the denominator.
    """
    x = x.float()
    intra = (x - centers[labels]).norm(dim=1).mean()
    present = centers[torch.unique(labels)]
    if len(present) < 2:
        return float("nan")
    pair = torch.cdist(present, present)
    k = len(present)
    inter = pair.sum() / (k * (k - 1))
    return float(intra / inter.clamp_min(1e-12))


@torch.no_grad()
def retrieval_metrics(x: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """Leave-one-out retrieval by Euclidean distance: precision@1 and MAP@R.

    For each query, the rest of the set is ranked by distance. R is the number of other
    samples of the query's class; AP@R = (1/R)·Σ_{k≤R} P@k·rel(k) (Musgrave et al., 2020).
    Queries whose class has no other sample are skipped.
    """
    x = x.float()
    n = len(x)
    class_sizes = torch.bincount(labels)
    r_all = class_sizes[labels] - 1  # (N,)
    max_r = int(r_all.max()) if n else 0
    p_at_1, map_r, counted = 0.0, 0.0, 0
    for start in range(0, n, chunk):
        q = slice(start, min(start + chunk, n))
        d = torch.cdist(x[q], x)  # (b, N)
        d[torch.arange(d.shape[0]), torch.arange(q.start, q.stop)] = float("inf")
        k = max(max_r, 1)
        nearest = d.topk(min(k, n - 1), largest=False).indices  # (b, k)
        relevant = (labels[nearest] == labels[q, None]).float()  # (b, k)
        r = r_all[q]
        valid = r > 0
        p_at_1 += float(relevant[valid, 0].sum())
        ranks = torch.arange(1, relevant.shape[1] + 1)
        precision = relevant.cumsum(1) / ranks  # (b, k)
        within_r = ranks[None, :] <= r[:, None]
        ap = (precision * relevant * within_r).sum(1) / r.clamp_min(1)
        map_r += float(ap[valid].sum())
        counted += int(valid.sum())
    if counted == 0:
        return {"precision_at_1": float("nan"), "map_at_r": float("nan")}
    return {"precision_at_1": p_at_1 / counted, "map_at_r": map_r / counted}
