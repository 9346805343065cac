"""How good the distances are: unknown detection, open-set recognition, retrieval, calibration.

What users act on is the served score (`min_distances`, the `unknown` flag, the ranking of
`distances`), so its quality is measured like accuracy is (benchmarks/bench_quality.py):

- AUROC: the probability that an unknown image scores higher (further) than a known one,
  ties counted half (the Mann-Whitney U statistic over the two sets' sizes).
- FPR at 95% TPR: the share of unknown images accepted as known when the threshold accepts
  95% of the known ones (the usual FPR95 of the OOD literature, knowns as positives).
- MAP@R and precision@1: leave-one-out retrieval ranked by the model's own distance kind.
- The far-OOD sets below, built from nothing but numpy, Pillow and the known test images.

Numpy (and Pillow for the glyphs) only: it runs on what onnxruntime returns.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from center_embed.contract import DISTANCE, distances

# --------------------------------------------------------------------------- detection


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown image > score of a known one), ties half; higher = further."""
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
    known images (a known image is accepted when its score is at or below it)."""
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


# --------------------------------------------------------------------------- retrieval


def retrieval_metrics(
    embeddings: np.ndarray, labels: np.ndarray, kind: str = DISTANCE, chunk: int = 512
) -> dict[str, float]:
    """Leave-one-out precision@1 and MAP@R (Musgrave et al. 2020), the rest of the set
    ranked by `kind` distance from each query; R = the other images of its class."""
    labels = np.asarray(labels)
    n = len(labels)
    r_all = np.bincount(labels)[labels] - 1
    k = max(int(r_all.max(initial=0)), 1)
    hits_at_1 = ap_sum = 0.0
    counted = 0
    for start in range(0, n, chunk):
        q = np.arange(start, min(start + chunk, n))
        d = distances(embeddings[q], embeddings, kind)  # (b, N)
        d[np.arange(len(q)), q] = np.inf
        nearest = np.argsort(d, axis=1, kind="stable")[:, : min(k, n - 1)]
        relevant = labels[nearest] == labels[q, None]  # (b, k)
        r = r_all[q]
        ranks = np.arange(1, relevant.shape[1] + 1)
        precision = np.cumsum(relevant, 1) / ranks
        ap = (precision * relevant * (ranks[None, :] <= r[:, None])).sum(1) / np.maximum(r, 1)
        valid = r > 0
        hits_at_1 += float(relevant[valid, 0].sum())
        ap_sum += float(ap[valid].sum())
        counted += int(valid.sum())
    if not counted:
        return {"precision_at_1": float("nan"), "map_at_r": float("nan")}
    return {"precision_at_1": hits_at_1 / counted, "map_at_r": ap_sum / counted}


# --------------------------------------------------------------------------- far-OOD sets
#
# Sets any machine can build, documented in the README. None of them is a class of the
# training data; each probes a different failure: no structure at all (noise), no texture
# (constant colours), no high frequencies (blur), the wrong colour statistics (inversion),
# another domain entirely (rendered characters, drawn shapes).


def far_ood_sets(known: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """name -> uint8 (n, H, W, 3) images; `known` (N, H, W, 3) are the known test images
    that the transformed sets start from."""
    rng = np.random.default_rng(seed)
    h, w = known.shape[1:3]
    picks = known[rng.choice(len(known), size=n, replace=len(known) < n)]
    builders: dict[str, Callable[[], np.ndarray]] = {
        "uniform_noise": lambda: rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "gaussian_noise": lambda: _clip(rng.normal(128, 64, (n, h, w, 3))),
        "constant_colour": lambda: np.broadcast_to(
            rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8), (n, h, w, 3)
        ).copy(),
        "blurred": lambda: _blur(picks, factor=8),
        "inverted": lambda: 255 - picks,
        "glyphs": lambda: _glyphs(n, h, w, rng),
        "shapes": lambda: _shapes(n, h, w, rng),
    }
    return {name: build() for name, build in builders.items()}


def shifted_sets(known: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Known images under a covariate shift that keeps their class (a grayscale cat is
    still a cat): reported beside the far-OOD sets, not counted as unknowns to catch."""
    rng = np.random.default_rng(seed + 1)
    picks = known[rng.choice(len(known), size=n, replace=len(known) < n)]
    gray = picks.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return {"grayscale": np.repeat(_clip(gray)[..., None], 3, axis=3)}


def _clip(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _blur(images: np.ndarray, factor: int) -> np.ndarray:
    """Average factor x factor blocks, then repeat them back: only the coarsest shapes stay."""
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))
    return _clip(blocks.repeat(factor, 1).repeat(factor, 2))


def _glyphs(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Grayscale renders of one digit or letter each, random size, place and shade, on a
    dark background: a character-recognition domain (like MNIST) built from Pillow's font."""
    from PIL import Image, ImageDraw, ImageFont

    alphabet = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    out = np.empty((n, h, w, 3), np.uint8)
    fonts = {size: ImageFont.load_default(size=size) for size in range(h // 2, h + 1, 2)}
    for i in range(n):
        image = Image.new("L", (w, h), int(rng.integers(0, 60)))
        size = int(rng.choice(list(fonts)))
        x, y = (int(v) for v in rng.integers(-size // 4, max(1, w - size // 2), 2))
        ImageDraw.Draw(image).text(
            (x, y), str(rng.choice(list(alphabet))), fill=int(rng.integers(160, 256)),
            font=fonts[size],
        )  # fmt: skip
        out[i] = np.asarray(image)[..., None]
    return out


def _shapes(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One to four flat-coloured ellipses, rectangles or triangles on a flat background."""
    from PIL import Image, ImageDraw

    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = (int(v) for v in rng.integers(-4, w - 4, 2))
            x1, y1 = x0 + int(rng.integers(6, w)), y0 + int(rng.integers(6, h))
            shape = int(rng.integers(3))
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        out[i] = np.asarray(image)
    return out
