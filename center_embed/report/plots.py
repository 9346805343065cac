"""The report's figures, each a function of plain arrays that writes one PNG (matplotlib).

Every figure has labelled axes, a legend or colour bar, and is saved with a tight bounding
box so that rotated class names are never clipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def class_colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def project_2d(
    embeddings: np.ndarray, centers: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str, str, str]:
    """(points (N, 2), centers (C, 2), x label, y label, description).

    A 2-D embedding is drawn as it is (the center-loss paper's figure); a wider one is
    projected on its first two principal components, fitted on the embeddings.
    """
    if embeddings.shape[1] == 2:
        return (
            embeddings,
            centers,
            "embedding dimension 1",
            "embedding dimension 2",
            "2-D embedding",
        )
    mean = embeddings.mean(0)
    _, s, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    axes = vt[:2].T  # (D, 2)
    explained = s**2 / (s**2).sum()
    return (
        (embeddings - mean) @ axes,
        (centers - mean) @ axes,
        f"principal component 1 ({explained[0]:.0%} of variance)",
        f"principal component 2 ({explained[1]:.0%} of variance)",
        f"PCA of the {embeddings.shape[1]}-d embeddings",
    )


def plot_embedding_2d(
    points: np.ndarray,
    centers: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
) -> None:
    """Test embeddings coloured by true class, with the class centers marked."""
    plt = _pyplot()
    colors = class_colors(len(class_names))
    fig, ax = plt.subplots(figsize=(9, 7.5))
    size = float(np.clip(20000 / max(len(points), 1), 3, 30))  # dots shrink as they crowd
    alpha = 0.35 if len(points) > 2000 else 0.7
    for j, name in enumerate(class_names):
        mine = points[labels == j]
        ax.scatter(mine[:, 0], mine[:, 1], s=size, alpha=alpha, color=colors[j], label=name,
                   linewidths=0, rasterized=True)  # fmt: skip
    _mark_centers(ax, centers, class_names, colors)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    legend = ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="true class"
    )
    for handle in legend.legend_handles[:-1]:
        handle.set_alpha(1)
        handle.set_sizes([30])
    center_handle = legend.legend_handles[-1]  # neutral, not the first class's colour
    center_handle.set_sizes([80])
    center_handle.set_facecolor("white")
    _save(fig, path)


def _mark_centers(ax, centers: np.ndarray, class_names: list[str], colors: list) -> None:
    """A cross per class center in its class's colour, named beside it."""
    from matplotlib import patheffects

    ax.scatter(centers[:, 0], centers[:, 1], s=160, marker="X", c=colors[: len(centers)],
               edgecolors="black", linewidths=1.2, label="class centers", zorder=3)  # fmt: skip
    outline = [patheffects.withStroke(linewidth=3, foreground="white")]
    for j, name in enumerate(class_names):
        ax.annotate(name, centers[j], xytext=(7, 7), textcoords="offset points", fontsize=9,
                    weight="bold", path_effects=outline, zorder=4)  # fmt: skip


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    """Rows: true class; columns: nearest center. Cells: share of the row (and count)."""
    plt = _pyplot()
    n = len(class_names)
    rows = confusion.sum(1, keepdims=True).clip(min=1)
    share = confusion / rows
    size = max(6.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class (nearest center)")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix of nearest-center labels")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.0%}\n{confusion[i, j]}",
                    ha="center",
                    va="center",
                    fontsize=7 if n > 10 else 8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    _save(fig, path)


def plot_unknown_score_histogram(
    scores: np.ndarray,
    correct: np.ndarray,
    threshold: float | None,
    threshold_note: str,
    path: Path,
) -> None:
    """Unknown scores of correct and wrong nearest-center predictions, with the threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    # The default score (min of ‖e − c‖² − ‖e‖², plus the atypicality) is often negative.
    bottom = min(0.0, float(np.quantile(scores, 0.005))) if len(scores) else 0.0
    top = float(np.quantile(scores, 0.995)) if len(scores) else 1.0
    if threshold is not None:
        top = max(top, threshold + 0.1 * abs(threshold))
    top = max(top, bottom + 1e-6)
    bins = np.linspace(bottom, top, 80)
    for mask, name, color in ((correct, "correct", "tab:green"), (~correct, "wrong", "tab:red")):
        values = scores[mask]
        if not len(values):
            continue
        label = f"{name} ({len(values)} images"
        if threshold is not None:
            label += f", {np.mean(values > threshold):.1%} above the threshold"
        ax.hist(
            np.clip(values, bottom, top),
            bins=bins,
            density=True,
            histtype="stepfilled",
            alpha=0.35,
            color=color,
            edgecolor=color,
            linewidth=1.2,
            label=label + ")",
        )
    if threshold is not None:
        ax.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1.5,
            label=f"unknown threshold {threshold:.3g} ({threshold_note})",
        )
    ax.set_xlabel("unknown score, higher = more unknown (values outside the bins drawn in "
                  "the outermost)")  # fmt: skip
    ax.set_ylabel("density (each histogram has area 1)")
    ax.set_title("Unknown score: correct versus wrong predictions")
    ax.set_xlim(bottom, top)
    ax.legend(loc="upper right", fontsize=9)
    _save(fig, path)


def plot_training_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Per-epoch training losses and validation figures from a run's metrics.jsonl."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = np.array([r["epoch"] for r in records], float)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ce, center), (acc, ratio) = axes
    _plot_losses(ce, center, epochs, records)
    _plot_validation(acc, ratio, [r for r in records if r.get("val")])
    for ax in axes.ravel():
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if np.all(epochs == np.round(epochs)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def _series(rows: list[dict[str, Any]], key: str, inner: str | None = None) -> np.ndarray:
    """rows[i][key] (or rows[i][inner][key]) as floats, NaN where a record lacks it."""
    values = [(r.get(inner) or {}).get(key) if inner else r.get(key) for r in rows]
    return np.array([np.nan if v is None else v for v in values], float)


def _plot_losses(ce, center, epochs: np.ndarray, records: list[dict[str, Any]]) -> None:
    """Cross-entropy and center loss per epoch; the center weight λ on a second axis."""
    for ax, key, color, label, title in (
        (ce, "train_ce", "tab:blue", "cross-entropy (softmax)", "softmax cross-entropy"),
        (center, "train_center", "tab:orange", "center loss $L_C$", "center loss"),
    ):
        ax.plot(epochs, _series(records, key), marker="o", color=color, label=label)
        ax.set_title(f"Training: {title}")
        ax.set_ylabel("loss (mean over the epoch)")
    ce.legend(loc="upper right")
    weight = _series(records, "center_weight")
    if np.isfinite(weight).any():
        twin = center.twinx()
        twin.plot(epochs, weight, linestyle=":", color="tab:gray", label="center weight λ")
        twin.set_ylabel("center weight λ")
        twin.set_ylim(0, np.nanmax(weight) * 1.25 or 1)  # a constant λ is a flat line, not noise
        lines = center.get_lines() + twin.get_lines()
        center.legend(lines, [line.get_label() for line in lines], loc="upper right")
    else:
        center.legend(loc="upper right")


def _plot_validation(acc, ratio, with_val: list[dict[str, Any]]) -> None:
    """Validation accuracies and the intra/inter distance ratio, per epoch that has them."""
    epochs = np.array([r["epoch"] for r in with_val], float)
    for key, name, color in (
        ("softmax_accuracy", "softmax", "tab:blue"),
        ("nearest_center_accuracy", "nearest center", "tab:green"),
    ):
        acc.plot(epochs, _series(with_val, key, "val"), marker="o", color=color, label=name)
    acc.set_title("Validation accuracy")
    acc.set_ylabel("accuracy")
    acc.legend(loc="lower right")
    ratio.plot(epochs, _series(with_val, "intra_inter_ratio", "val"), marker="o",
               color="tab:purple", label="intra / inter distance")  # fmt: skip
    ratio.set_title("Validation intra/inter distance ratio (lower: tighter classes)")
    ratio.set_ylabel("ratio")
    ratio.legend(loc="upper right")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
