"""`center-embed report`: an evaluation report of an exported model that a person can read.

    center-embed report model.onnx --data ../shared/data/cifar10 --run runs/cpu --out report/

writes report/metrics.json, report/index.html (one file: the figures are embedded, and also
saved beside it as PNG files) and four PNG figures:

    embedding_2d.png       test embeddings in 2-D (PCA unless the model is 2-D), centers marked
    confusion.png          confusion matrix of nearest-center labels
    unknown_score_hist.png unknown scores of correct versus wrong predictions, the threshold
    training_curves.png    the run's metrics.jsonl, per epoch (only with --run)

Where each figure comes from, said again in the report itself: everything about the
embeddings is computed here, from the ONNX model's outputs on the test split of --data. The
ONNX model outputs no logits, so softmax accuracy is copied from the run's eval.json
(written by `center-embed train` / `eval` with the torch checkpoint) when --run is given,
else from the training facts in the model's metadata.

Torch-free: every figure comes from center_embed.metrics on the ONNX outputs, so a serving
install with the `score` extra (matplotlib for the plots) writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import read_centers
from center_embed.errors import UserError
from center_embed.fileio import atomic_path, atomic_write_text, sha256_file
from center_embed.metrics import intra_inter_ratio, retrieval_metrics

PLOTS = {
    "embedding_2d": "embedding_2d.png",
    "confusion": "confusion.png",
    "unknown_score_hist": "unknown_score_hist.png",
    "training_curves": "training_curves.png",
}


# --------------------------------------------------------------------------- inputs


def load_split(data: str, class_names: list[str], image_size: int, split: str):
    """(images, labels, source) of `split`, restricted and relabelled to the model's classes."""
    from center_embed.data import load_for_classes

    dataset = load_for_classes(data, class_names, image_size)
    chosen = getattr(dataset, split)
    if not len(chosen):
        raise UserError(f"the {split} split of {data} has no images")
    return chosen.images, np.asarray(chosen.labels), dataset.source


def read_run(run: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(eval.json or None, the per-epoch records of metrics.jsonl) of a run folder."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    evaluation = None
    if (run / "eval.json").is_file():
        try:
            evaluation = json.loads((run / "eval.json").read_text())
        except ValueError as e:
            raise UserError(f"{run / 'eval.json'} is not valid JSON: {e}") from None
    records: dict[float, dict[str, Any]] = {}
    if (run / "metrics.jsonl").is_file():
        for n, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[float(record["epoch"])] = record  # a resumed run may repeat an epoch
            except (ValueError, KeyError, TypeError):
                raise UserError(
                    f"{run / 'metrics.jsonl'} line {n} is not a metrics record"
                ) from None
    return evaluation, [records[k] for k in sorted(records)]


# --------------------------------------------------------------------------- metrics


def embedding_metrics(
    outputs: dict[str, np.ndarray],
    labels: np.ndarray,
    centers: np.ndarray,
    class_names: list[str],
    unknown: np.ndarray,
) -> dict[str, Any]:
    """Every figure the ONNX outputs give on a labelled split."""
    predicted = outputs["labels"]
    correct = predicted == labels
    embeddings = outputs["embeddings"]
    per_class = {
        name: float(correct[labels == j].mean()) if (labels == j).any() else None
        for j, name in enumerate(class_names)
    }
    known = ~unknown
    return {
        "nearest_center_accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        **retrieval_metrics(embeddings, labels),
        "intra_inter_ratio": intra_inter_ratio(embeddings, labels, centers),
        "unknown_rate": float(unknown.mean()),
        "unknown_rate_correct": float(unknown[correct].mean()) if correct.any() else None,
        "unknown_rate_wrong": float(unknown[~correct].mean()) if (~correct).any() else None,
        "accuracy_on_known": float(correct[known].mean()) if known.any() else None,
    }


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts; rows true class, columns predicted."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def softmax_figures(
    evaluation: dict[str, Any] | None, training: dict[str, Any]
) -> dict[str, Any] | None:
    """Softmax accuracy and its provenance: the run's eval.json, else the model metadata."""
    if evaluation and "softmax_accuracy" in evaluation:
        result = {"softmax_accuracy": float(evaluation["softmax_accuracy"])}
        how = "torch checkpoint" + (", bf16 autocast" if evaluation.get("bf16") else "")
        result["source"] = f"the run's eval.json ({how}; written by center-embed train/eval)"
        result["data"] = evaluation.get("data")
        for key in ("nearest_center_accuracy", "precision_at_1", "map_at_r", "intra_inter_ratio"):
            if key in evaluation:
                result[f"torch_{key}"] = float(evaluation[key])
        if isinstance(evaluation.get("tta"), dict) and "softmax_accuracy" in evaluation["tta"]:
            result["tta_level"] = evaluation["tta"].get("level")
            result["tta_softmax_accuracy"] = float(evaluation["tta"]["softmax_accuracy"])
        return result
    test = (training or {}).get("test") or {}
    if "softmax_accuracy" in test:
        return {
            "softmax_accuracy": float(test["softmax_accuracy"]),
            "source": "the model's metadata (center_embed.training.test: measured with the "
            "torch checkpoint before export)",
            "data": (training or {}).get("data_source"),
        }
    return None


# --------------------------------------------------------------------------- the report


def build_report(
    model_path: str | Path,
    out: str | Path,
    data: str | None = None,
    run: str | Path | None = None,
    *,
    split: str = "test",
    batch_size: int = 256,
    max_points: int = 5000,
    device: str = "auto",
    threads: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write metrics.json, index.html and the PNGs under `out` (only once all succeeded: a
    failure leaves no folder; an existing one needs `overwrite`); return the metrics."""
    from center_embed.report import plots
    from center_embed.report.html import render_html
    from center_embed.runtime import OnnxModel, RuntimeOptions, describe

    out = Path(out)
    _check_report_folder(out, overwrite)
    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, not {split!r}")
    model = OnnxModel(model_path, RuntimeOptions(device=device, threads=threads))
    info, meta = model.info, describe(model.info)
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    data = _dataset(data, training)
    evaluation, records = read_run(run) if run else (None, [])
    images, labels, source = load_split(str(data), info.class_names, info.input_size[0], split)
    outputs = model.run_batched(images, batch_size)
    centers = read_centers(model_path)
    unknown = model.unknown(outputs)
    onnx_metrics = embedding_metrics(outputs, labels, centers, info.class_names, unknown)
    confusion = confusion_matrix(labels, outputs["labels"], info.num_classes)

    with atomic_path(out, directory=True) as folder:
        written = _plot_all(
            plots, folder, outputs, labels, centers, confusion, info, meta, records, max_points,
            seed,
        )  # fmt: skip
        report = {
            "model": model_facts(model, str(model_path), meta),
            "data": {"path": str(data), "source": source, "split": split, "images": len(labels)},
            "onnx": {
                "source": f"computed here from the ONNX model's outputs on the {split} split of "
                f"{data} ({len(labels)} images)",
                **onnx_metrics,
                "confusion_matrix": confusion.tolist(),
            },
            "softmax": softmax_figures(evaluation, training),
            "run": str(run) if run else None,
            "epochs_in_run": len(records),
            "plots": written,
        }
        atomic_write_text(folder / "metrics.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(folder / "index.html", render_html(report, folder))
        if out.exists():  # --overwrite of a report folder (checked before anything ran)
            shutil.rmtree(out)
    return report


def _dataset(data: str | None, training: dict[str, Any]) -> str:
    """--data, else the dataset the model's metadata records."""
    data = data or training.get("data_source")
    if not data:
        raise UserError("the model does not record its dataset; pass --data")
    return data


REPORT_FILES = ("metrics.json", "index.html")


def _check_report_folder(out: Path, overwrite: bool) -> None:
    """An existing `out` is refused, and with `overwrite` replaced only if it is a report."""
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not (out.is_dir() and all((out / name).is_file() for name in REPORT_FILES)):
        raise UserError(f"{out} is not a report folder (no metrics.json, index.html); "
                        "--overwrite replaces only a report")  # fmt: skip


def model_facts(model, path: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The report's "model" section: which file, what it is, how it runs."""
    info = model.info
    return {
        "path": path,
        "sha256": sha256_file(model.path),
        "embedding_dim": info.embedding_dim,
        "classes": info.class_names,
        "precision": info.precision,
        "unknown_threshold": info.unknown_threshold,
        "unknown_threshold_calibration": meta.get("unknown_threshold_calibration"),
        "provider": model.provider,
    }


def _plot_all(
    plots, out, outputs, labels, centers, confusion, info, meta, records, max_points, seed
) -> dict[str, str]:
    written = {}
    pick = _stratified_sample(labels, max_points, seed)
    points, centers_2d, xlabel, ylabel, what = plots.project_2d(outputs["embeddings"], centers)
    shown = (
        f"{len(pick)} of {len(labels)} test images"
        if len(pick) < len(labels)
        else (f"{len(labels)} test images")
    )
    plots.plot_embedding_2d(
        points[pick],
        centers_2d,
        labels[pick],
        info.class_names,
        xlabel,
        ylabel,
        f"{what}: {shown}, and the class centers",
        out / PLOTS["embedding_2d"],
    )
    written["embedding_2d"] = PLOTS["embedding_2d"]
    plots.plot_confusion(confusion, info.class_names, out / PLOTS["confusion"])
    written["confusion"] = PLOTS["confusion"]
    calibration = meta.get("unknown_threshold_calibration") or {}
    note = (
        ", ".join(f"{k} {calibration[k]}" for k in ("quantile", "split") if k in calibration)
        or "as stored in the model"
    )
    plots.plot_unknown_score_histogram(
        outputs["unknown_scores"],
        outputs["labels"] == labels,
        info.unknown_threshold,
        note,
        out / PLOTS["unknown_score_hist"],
    )
    written["unknown_score_hist"] = PLOTS["unknown_score_hist"]
    if records:
        plots.plot_training_curves(records, out / PLOTS["training_curves"])
        written["training_curves"] = PLOTS["training_curves"]
    return written


def _stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n indices, the same share of every class, in order (a seeded draw)."""
    if len(labels) <= n:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.flatnonzero(labels == c))[: max(1, round(n * np.mean(labels == c)))]
        for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(keep))
