"""The images export calibrates and verifies on, and the unknown threshold computed from them.

The unknown threshold is a quantile: the unknown score below which a share `quantile` of
the correctly classified held-out images fall. It is taken on the held-out validation
split the checkpoint's own run set aside (rebuilt from the config it stores), so it is
never tuned on the test split (the test split is only measured). A run that held nothing
out (val_size 0) cannot be calibrated from its own data: export refuses, naming the two
ways out (retrain with data.val_size, or --calibration-data with a separate dataset). A
--calibration-data that is the run's own dataset, or whose test images are largely the
run's training images, is refused too: it would calibrate on what the run measures or
learnt from.

Imports numpy and center_embed's torch-free data readers only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from center_embed.data import (
    Dataset,
    Split,
    load_for_classes,
    require_test_split,
    split_validation,
)
from center_embed.errors import UserError

if TYPE_CHECKING:  # only the type: loading a checkpoint is torch's business, not ours
    from center_embed.training.checkpoint import Checkpoint


@dataclass
class CalibrationSet:
    """Held-out images for the threshold and the parity check, and training images for int8."""

    held_out: Split  # threshold calibration and torch/onnxruntime parity
    train: Split  # int8 activation-range calibration
    description: dict[str, Any]  # where `held_out` came from, for the model's metadata


def load_run_dataset(ckpt: Checkpoint, data: str | None = None) -> Dataset:
    """The checkpoint's dataset, restricted and relabelled to its classes.

    `data` overrides where the dataset lies now; otherwise the run's configured path, then
    the resolved source it recorded, are tried.
    """
    cfg = ckpt.config.data
    candidates = [data] if data else [cfg.path, ckpt.data_source]
    path = next((p for p in candidates if p and Path(p).expanduser().exists()), None)
    if path is None:
        tried = ", ".join(dict.fromkeys(str(p) for p in candidates if p))  # each path once
        raise UserError(
            f"the run's dataset is not found (tried {tried}); pass its location with --data"
        )
    return load_for_classes(path, ckpt.class_names, cfg.image_size, cfg.cache_dir)


def calibration_set(
    ckpt: Checkpoint, data: str | None = None, calibration_data: str | None = None
) -> CalibrationSet:
    """The run's validation split, or the test split of `calibration_data` when given;
    plus the run's training images. A run without a validation split is refused: its
    threshold would otherwise be tuned on the test split, which is only measured."""
    cfg = ckpt.config.data
    dataset = load_run_dataset(ckpt, data)
    train, val = split_validation(dataset.train, cfg.val_size, cfg.seed)
    if calibration_data:
        other = load_for_classes(calibration_data, ckpt.class_names, cfg.image_size, cfg.cache_dir)
        held_out = require_test_split(other, "--calibration-data")
        refuse_the_runs_own_images(other, dataset, train)
        where = {"split": "test", "source": other.source}
    elif len(val):
        held_out = val
        where = {"split": "validation", "source": dataset.source}
        where |= {"val_size": cfg.val_size, "seed": cfg.seed}
    else:
        raise UserError(
            "the run held out no validation images (data.val_size=0), and the unknown "
            "threshold is never calibrated on the test split: retrain with "
            "--set data.val_size=N (a count, or a share such as 0.1), or pass "
            "--calibration-data DIR (a separate dataset whose test split calibrates it)"
        )
    return CalibrationSet(held_out, train, where)


MAX_SHARED_SHARE = 0.1  # of calibration images that may also be training images of the run


def refuse_the_runs_own_images(other: Dataset, run: Dataset, train: Split) -> None:
    """UserError when --calibration-data is the run's own dataset (its test split is what
    the run is measured on) or when more than MAX_SHARED_SHARE of its test images are, pixel
    for pixel, training images of the run (a copy of the training folder)."""
    if Path(other.source).resolve() == Path(run.source).resolve():
        raise UserError(
            f"--calibration-data {other.source} is the run's own dataset: its test split is "
            "what the run is measured on, and calibrating on it would bias that measure; "
            "pass a separate dataset"
        )
    seen = {_digest(image) for image in train.images}
    shared = sum(_digest(image) in seen for image in other.test.images)
    if shared > MAX_SHARED_SHARE * len(other.test):
        raise UserError(
            f"{shared} of the {len(other.test)} test images of --calibration-data "
            f"{other.source} are training images of the run: a threshold calibrated on images "
            "the model learnt from flags too little; pass images it has not seen"
        )


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def unknown_thresholds(
    unknown_scores: np.ndarray,
    predicted: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    quantile: float,
) -> tuple[float | None, dict[str, float], dict[str, Any]]:
    """Global and per-class thresholds: the `quantile` of unknown scores over correctly
    classified images (of that class). A class with no correct image gets the global one.

    Returns (global threshold or None if nothing was classified correctly, per-class
    thresholds, facts for the calibration metadata).
    """
    if not 0 < quantile <= 1:
        raise UserError(f"quantile must lie in (0, 1], not {quantile}")
    correct = predicted == labels
    facts: dict[str, Any] = {
        "quantile": quantile,
        "images": int(len(labels)),
        "correct": int(correct.sum()),
        "rule": "quantile of unknown_scores over correctly classified held-out images",
    }
    if not correct.any():
        return None, {}, facts
    overall = float(np.quantile(unknown_scores[correct], quantile, method="inverted_cdf"))
    per_class, fallback = {}, []
    for j, name in enumerate(class_names):
        mine = correct & (labels == j)
        if mine.any():
            per_class[name] = float(
                np.quantile(unknown_scores[mine], quantile, method="inverted_cdf")
            )
        else:
            per_class[name] = overall
            fallback.append(name)
    if fallback:
        facts["classes_given_global_threshold"] = fallback
    return overall, per_class, facts


def sample(split: Split, n: int, seed: int = 0) -> Split:
    """At most n images of a split, drawn without replacement by a seeded permutation."""
    if len(split) <= n:
        return split
    index = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return split.subset(index)
