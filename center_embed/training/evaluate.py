"""`center-embed eval`: test-split metrics of a checkpoint, as a table and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from center_embed.data import load_for_classes, require_test_split
from center_embed.fileio import atomic_write_text
from center_embed.metrics import retrieval_metrics
from center_embed.training.checkpoint import Preprocess, build_model, load_checkpoint
from center_embed.training.inference import resolve_device, split_metrics, use_bf16


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    device: str = "auto",
    tta: int | None = None,
    bf16: str = "auto",
) -> dict[str, Any]:
    """Metrics on the test split named by the checkpoint's config (or `data`).

    Without test-time augmentation the figures are those the exported ONNX model gives;
    with `tta` (default: the run's `train.tta`) they are reported under `tta`.
    """
    ckpt = load_checkpoint(checkpoint)
    model, criterion, cfg = build_model(ckpt)
    dev = resolve_device(device)
    model.to(dev)
    dataset = load_for_classes(
        data or cfg.data.path, ckpt["class_names"], cfg.data.image_size, cfg.data.cache_dir
    )
    require_test_split(dataset, "eval")
    use16 = use_bf16(bf16, dev)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    plain, e = split_metrics(model, criterion.centers, dataset.test, preprocess, dev, use16)
    plain.update(retrieval_metrics(e.numpy(), dataset.test.labels))
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": dataset.source,
        "test_images": len(dataset.test),
        "bf16": use16,
        **plain,
    }
    tta = cfg.train.tta if tta is None else tta
    if tta:
        with_tta, _ = split_metrics(
            model, criterion.centers, dataset.test, preprocess, dev, use16, tta
        )
        result["tta"] = {"level": tta, **with_tta}
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("softmax accuracy", result["softmax_accuracy"]),
        ("nearest-center accuracy", result["nearest_center_accuracy"]),
        ("precision@1", result["precision_at_1"]),
        ("MAP@R", result["map_at_r"]),
        ("intra/inter distance ratio", result["intra_inter_ratio"]),
    ]
    if "tta" in result:
        t = result["tta"]
        rows += [
            (f"softmax accuracy, TTA {t['level']}", t["softmax_accuracy"]),
            (f"nearest-center accuracy, TTA {t['level']}", t["nearest_center_accuracy"]),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"test split of {result['data']} ({result['test_images']} images)"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in rows]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
