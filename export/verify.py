"""Checking an exported model: the ONNX checker, parity with torch, accuracy on a split.

Parity is measured on real images (the held-out split), not random noise: a network's
activations on noise are not the ones that matter, and label agreement on noise is
meaningless. Errors are relative to the largest reference value of each output,
max|onnx − torch| / max|torch|, because element-wise relative error is undefined near
zero (distances of an image to its own center are close to it). The atypicality is 0 for
nearly every real image, so it is also compared on a few synthetic ones (a flat colour,
noise), where it is not, relative to the largest reference distance (its units); int8
files on real images only (see _atypicality_error).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import ATYPICALITY, UNKNOWN_SCORES, our_metadata, run_batched
from center_embed.data import load_for_classes
from center_embed.errors import UserError
from center_embed.runtime import OnnxModel, RuntimeOptions

PARITY_BATCHES = (1, 3, 17)
# Relative error allowed per output, and the share of labels that may differ from torch's
# beyond ties. fp32 must agree on every label. int8 embeddings move by about a tenth of
# their largest value on CIFAR-10 (more on narrow networks); what int8 must keep is the
# nearest center, which `export` also measures on the whole held-out split.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"embeddings": 1e-4, "distances": 1e-4, "labels": 0.0},
    "fp16": {"embeddings": 2e-2, "distances": 2e-2, "labels": 0.1},
    "int8": {"embeddings": 0.5, "distances": 0.25, "labels": 0.2},
}


class VerificationFailed(UserError):
    """The exported model disagrees with torch beyond its tolerance (the file is removed)."""


def check_file(path: str | Path) -> None:
    """onnx.checker with full_check (shape inference included), as a one-line error."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VerificationFailed(f"the exported model fails onnx.checker: {first}") from None


def relative_error(
    actual: np.ndarray, reference: np.ndarray, scale_of: np.ndarray | None = None
) -> float:
    """max|actual − reference| over the largest |value| of `scale_of` (default: of the
    reference itself): an unknown score's error is measured against the distances' scale,
    as one image's score may lie near 0."""
    scale_of = reference if scale_of is None else scale_of
    scale = max(float(np.abs(scale_of).max()), 1e-12) if scale_of.size else 1.0
    return float(np.abs(actual.astype(np.float64) - reference).max() / scale)


def label_mismatches(labels: np.ndarray, reference: dict[str, np.ndarray], tol: float) -> int:
    """Labels that differ from torch's, not counting ties: an image whose two candidate
    centers lie within `tol` (relative) of each other in torch's own distances."""
    d = reference["distances"]
    scale = max(float(np.abs(d).max()), 1e-12)
    rows = np.arange(len(labels))
    gap = np.abs(d[rows, labels] - d[rows, reference["labels"]]) / scale
    return int(((labels != reference["labels"]) & (gap > tol)).sum())


def check_parity(
    model: OnnxModel,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    images: np.ndarray,
    batches: tuple[int, ...] = PARITY_BATCHES,
) -> dict[str, Any]:
    """Compare onnxruntime with the torch `reference` at each batch size; raise
    VerificationFailed beyond the model precision's tolerance. Returns the figures."""
    precision = model.info.precision
    tol = TOLERANCES[precision]
    worst = {"embeddings": 0.0, "distances": 0.0, UNKNOWN_SCORES: 0.0}
    mismatched = compared = 0
    for b in batches:
        batch = _take(images, b)
        got, want = model.run(batch), reference(batch)
        for name in worst:
            scale = want["distances"] if name == UNKNOWN_SCORES else None
            worst[name] = max(worst[name], relative_error(got[name], want[name], scale))
        if got["labels"].shape != (b,) or got["min_distances"].shape != (b,):
            raise VerificationFailed(f"batch of {b}: outputs have the wrong shape")
        mismatched += label_mismatches(got["labels"], want, tol["distances"])
        compared += b
    if ATYPICALITY in model.output_names:
        worst[ATYPICALITY] = _atypicality_error(model, reference, images)
    report = {
        "batch_sizes": list(batches),
        "precision": precision,
        "max_relative_error": worst,
        "label_mismatches": mismatched,
        "labels_compared": compared,
        "tolerance": tol,
    }
    report["summary"] = (
        f"embeddings {worst['embeddings']:.2e}, distances {worst['distances']:.2e}, "
        f"unknown scores {worst[UNKNOWN_SCORES]:.2e} (of the largest distance) relative "
        f"(tolerance {tol['embeddings']:g}, {tol['distances']:g}); "
        f"{mismatched}/{compared} labels differ"
    )
    if ATYPICALITY in worst:
        report["summary"] += f"; atypicality {worst[ATYPICALITY]:.2e} of the largest distance"
    limits = {**tol, ATYPICALITY: tol["distances"], UNKNOWN_SCORES: tol["distances"]}
    too_far = [name for name, err in worst.items() if not err <= limits[name]]
    if too_far or mismatched > tol["labels"] * compared:
        raise VerificationFailed(f"onnxruntime disagrees with torch: {report['summary']}")
    return report


def _atypicality_error(model: OnnxModel, reference, images: np.ndarray) -> float:
    """max |atypicality − torch's| over real and (not for int8) synthetic images, relative
    to the largest of torch's distances on them. int8 activations saturate beyond the ranges
    calibrated on training images, so an image unlike them (noise) gets another, still
    large, atypicality; and an int8 atypicality is fitted on the int8 graph's own
    activations (export/atypicality.py), so it agrees with torch's on real images only."""
    h, w = model.info.input_size
    rng = np.random.default_rng(0)
    batch = _take(images, 8)
    if model.info.precision != "int8":
        flat = np.broadcast_to(rng.integers(0, 256, (2, 1, 1, 3), dtype=np.uint8), (2, h, w, 3))
        noise = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        batch = np.concatenate([batch, flat, noise])
    return atypicality_error(model.run(batch), reference(batch))


def atypicality_error(out: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """max |atypicality − the reference's|, relative to the largest reference distance (its
    units: how far it moves an image's distances); 0 for no images."""
    if not reference["distances"].size:
        return 0.0
    error = np.abs(out[ATYPICALITY].astype(np.float64) - reference[ATYPICALITY]).max()
    return float(error) / max(float(np.abs(reference["distances"]).max()), 1e-12)


def _take(images: np.ndarray, n: int) -> np.ndarray:
    """n images (cycling through a short split), as a contiguous uint8 batch."""
    index = np.arange(n) % len(images)
    return np.ascontiguousarray(images[index])


# --------------------------------------------------------------------------- accuracy


def split_accuracy(
    model_path: str | Path,
    data: str | None = None,
    split: str = "test",
    options: RuntimeOptions | None = None,
    batch_size: int = 256,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Nearest-center accuracy of an ONNX model on a dataset split, through `runtime`.

    `data` defaults to the dataset the model was trained on (its training metadata). Any
    runtime or precision other than onnxruntime at the file's own precision is also
    compared with that reference on the same images (`parity`, see `runtime_parity`).
    `progress` draws a bar on stderr (a CIFAR-10 split takes seconds to minutes).
    """
    options = options or RuntimeOptions()
    model = OnnxModel(model_path, options)
    info = model.info
    source = data or _training_source(model)
    dataset = load_for_classes(source, info.class_names, model.image_size)
    images = getattr(dataset, split)
    if not len(images):
        raise UserError(f"the {split} split of {dataset.source} has no images; verify needs one")
    truth = np.asarray(images.labels)
    run = _with_progress(model.run, len(truth), progress)
    started = time.perf_counter()
    out = run_batched(run, images.images, batch_size)
    seconds = time.perf_counter() - started
    result = {
        "model": str(model_path),
        "data": dataset.source,
        "split": split,
        "images": int(len(truth)),
        "precision": info.precision,
        "provider": model.provider,
        "runtime": model.runtime,
        "nearest_center_accuracy": float((out["labels"] == truth).mean()),
        "images_per_second": len(truth) / max(seconds, 1e-9),
    }
    if info.unknown_threshold is not None:
        result["unknown_rate"] = float(model.unknown(out).mean())
    if (model.choice.runtime, model.choice.precision) != ("onnxruntime", info.precision):
        reference = OnnxModel(
            model_path, RuntimeOptions(device="cpu", threads=options.threads)
        ).run_batched(images.images, batch_size)
        flag = info.unknown if info.unknown_threshold is not None else None
        result["parity"] = runtime_parity(out, reference, truth, flag)
    return result


# What another runtime or precision must keep against onnxruntime on the same file, on a
# real split: the nearest center on 99% of images, and distances within a few percent of
# the largest (bf16 keeps 8 bits of mantissa: ~0.4% per value, compounded over the layers;
# docs/runtimes.md for what was measured), and the unknown threshold flagging the same
# images on 99% of them (then it holds for this runtime and needs no recalibration).
RUNTIME_TOLERANCES = {"label_agreement": 0.99, "distances": 0.05, "unknown_agreement": 0.99}


def runtime_parity(
    out: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    truth: np.ndarray,
    unknown: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
) -> dict[str, Any]:
    """A runtime's outputs against the onnxruntime reference on the same images: accuracy,
    label agreement, errors relative to the largest reference value (as the export's
    parity; the atypicality's relative to the largest reference distance, its units), the
    share of images with an atypicality above 0 in both, the worst per-image unknown-score
    error (relative to the image's largest reference distance: a score may be negative or
    near zero), and whether the unknown flag, `unknown(unknown_scores, labels)`
    (ModelInfo.unknown), flags the same images. `passed` applies RUNTIME_TOLERANCES."""
    ref_min, min_d = reference[UNKNOWN_SCORES], out[UNKNOWN_SCORES]
    row_scale = np.abs(reference["distances"]).max(1, initial=0.0)  # (N,)
    figures: dict[str, Any] = {
        "reference": "onnxruntime, the file's own precision",
        "reference_accuracy": float((reference["labels"] == truth).mean()),
        "label_agreement": float((out["labels"] == reference["labels"]).mean()),
        **{
            name: _relative_error(out[name], reference[name])
            for name in ("embeddings", "distances")
        },
        UNKNOWN_SCORES: _relative_error(
            out[UNKNOWN_SCORES], reference[UNKNOWN_SCORES], reference["distances"]
        ),  # fmt: skip
        "unknown_score_p99": float(
            np.quantile(np.abs(min_d - ref_min) / np.maximum(row_scale, 1e-12), 0.99)
            if len(ref_min)
            else 0.0
        ),
        "atypicality": atypicality_error(out, reference),
        "atypical_share": float((out[ATYPICALITY] > 0).mean()) if len(ref_min) else 0.0,
        "atypical_share_reference": float((reference[ATYPICALITY] > 0).mean())
        if len(ref_min)
        else 0.0,
    }
    if unknown is not None:
        ref_flags = unknown(ref_min, reference["labels"])
        figures["unknown_rate_reference"] = float(ref_flags.mean())
        figures["unknown_agreement"] = float((unknown(min_d, out["labels"]) == ref_flags).mean())
    tol = RUNTIME_TOLERANCES
    checks = [figures["label_agreement"] >= tol["label_agreement"],
              figures["distances"] <= tol["distances"],
              figures[UNKNOWN_SCORES] <= tol["distances"],
              figures["atypicality"] <= tol["distances"],
              figures.get("unknown_agreement", 1.0) >= tol["unknown_agreement"]]  # fmt: skip
    figures["tolerances"], figures["passed"] = tol, all(checks)
    return figures


def _relative_error(
    value: np.ndarray, reference: np.ndarray, scale_of: np.ndarray | None = None
) -> float:
    """max|value − reference| / max|scale_of| (default: the reference; 0 for no images)."""
    if reference.size == 0:
        return 0.0
    return relative_error(value, reference, scale_of)


def _with_progress(run: Callable, total: int, progress: bool) -> Callable:
    """`run` (one batch -> outputs), advancing a progress bar on stderr by each batch."""
    if not progress:
        return run
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="verify", leave=False)

    def run_and_count(batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = run(batch)
        bar.update(len(batch))
        if bar.n >= total:
            bar.close()
        return outputs

    return run_and_count


def _training_source(model: OnnxModel) -> str:
    raw = our_metadata(model.info.metadata).get("training", "{}")
    source = json.loads(raw).get("data_source")
    if not source or not Path(source).exists():
        raise UserError(f"{model.path} does not say where its data lies now; pass --data")
    return source


def compare_with_checkpoint(
    result: dict[str, Any], checkpoint: str | Path, data: str | None = None
) -> dict[str, Any]:
    """The checkpoint's own fp32 torch figure on the same split (no TTA, no bf16)."""
    from center_embed.training.evaluate import evaluate_checkpoint

    if result["split"] != "test":
        raise UserError("--checkpoint compares on the test split only")
    data = data or result["data"]  # the very images onnxruntime just saw
    torch_result = evaluate_checkpoint(checkpoint, data, device="cpu", tta=0, bf16="off")
    torch_acc = torch_result["nearest_center_accuracy"]
    return {
        "torch_nearest_center_accuracy": torch_acc,
        "difference_points": 100 * (result["nearest_center_accuracy"] - torch_acc),
    }
