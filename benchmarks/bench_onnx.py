"""Inference speed of the exported model: onnxruntime fp32 over torch eager, int8 over fp32.

    CENTER_EMBED_CACHE=/tmp/cecache .venv/bin/python benchmarks/bench_onnx.py \\
        --checkpoint /tmp/bench/cpu1/best.pt

The checkpoint is exported three times (fp32 and int8, both verified, and fp32 without the
atypicality output) into a temporary folder. The engines then run the same work on the same
real test images: uint8 pixels in, normalisation, the backbone, the atypicality, distances
to every center, nearest center out.

    torch      the checkpoint's EmbeddingNet in fp32 eager mode (inference_mode), with
               the same normalisation, atypicality and distance code as the exported graph
    ort-fp32   the fp32 ONNX model through center_embed.runtime (the service's session)
    ort-int8   the int8 ONNX model, the same way
    ort-fp32-no-atypicality   the fp32 model exported with --no-atypicality: what the
               atypicality output costs

Each is timed at batch 1 and batch 64 for a few seconds, engine after engine, in several
rounds; the median of the rounds counts. Alternating rounds means a load that comes and
goes on the machine weighs on every engine alike, so the ratios hold even when the
absolute figures do not. torch and onnxruntime get the same thread count (--threads);
on a machine shared with other jobs, run it with --threads 1 as well: torch's OpenMP
threads degrade far more than onnxruntime's when the cores are oversubscribed.

Targets: ort-fp32/torch >= 1.5, ort-int8/ort-fp32 >= 2, and int8 nearest-center test
accuracy within 0.5 points of fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import add_json_argument, write_results

from center_embed.runtime import OnnxModel, RuntimeOptions

BATCHES = (1, 64)
TARGETS = {"fp32_over_torch": 1.5, "int8_over_fp32": 2.0, "int8_accuracy_drop_points": 0.5}


def images_per_second(run: Callable[[np.ndarray], object], images: np.ndarray, batch: int,
                      seconds: float) -> float:  # fmt: skip
    """Run batch after batch (cycling through `images`) for `seconds`; images per second."""
    run(images[:batch])  # warm-up: first-call allocations and kernel selection
    starts = range(0, len(images) - batch + 1, batch)
    batches = [np.array(images[i : i + batch]) for i in starts]  # own, writable copies
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(batches[done % len(batches)])
        done += 1
    return done * batch / (time.perf_counter() - start)


def engines(
    checkpoint: str, files: dict[str, Path], threads: int, bf16: bool, data: str | None
) -> dict[str, Callable]:
    import torch

    from center_embed.export.calibrate import calibration_set
    from center_embed.export.onnx_export import prepare_graph, torch_reference
    from center_embed.training.checkpoint import Checkpoint

    ckpt = Checkpoint.load(checkpoint)
    model, criterion = ckpt.build_model()
    score = OnnxModel(files["fp32"], RuntimeOptions(device="cpu")).info.unknown_score
    calib = calibration_set(ckpt, data)  # the graph export fitted: the same images and seed
    graph = prepare_graph(ckpt, model, criterion.centers, calib, score)
    reference = torch_reference(graph, ckpt.preprocess)

    def torch_run(batch: np.ndarray, autocast: bool = False):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return reference(batch)

    runs = {"torch": torch_run} | {
        f"ort-{name}": OnnxModel(path, RuntimeOptions(device="cpu", threads=threads)).run
        for name, path in files.items()
    }
    if bf16:  # for information: what `center-embed eval` uses on CPUs with AMX
        runs["torch-bf16"] = lambda batch: torch_run(batch, autocast=True)
    return runs


def accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    out = OnnxModel(model_path, RuntimeOptions(device="cpu")).run_batched(images)
    return float((out["labels"] == labels).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="/tmp/bench/cpu1/best.pt")
    p.add_argument("--data", help="where the run's dataset lies now (default: the run's)")
    p.add_argument("--seconds", type=float, default=3.0, help="per engine, batch and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="threads for torch and onnxruntime alike (default: one per core)",
    )  # fmt: skip
    add_json_argument(p)
    p.add_argument(
        "--torch-bf16", action="store_true", help="also time torch under bf16 autocast (info)"
    )
    args = p.parse_args()
    import torch  # after the arguments: --help needs no torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        result, rate = measure(args, Path(tmp))
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()
    print(report(result, rate))
    write_results("onnx", result, args.json)
    return 0


def measure(args: argparse.Namespace, folder: Path) -> tuple[dict, dict]:
    """Export, time every engine round by round, and measure test accuracy."""
    from center_embed.export.calibrate import load_run_dataset
    from center_embed.export.onnx_export import export_checkpoint
    from center_embed.training.checkpoint import Checkpoint

    files = {
        "fp32": export_checkpoint(args.checkpoint, folder / "fp32.onnx", data=args.data),
        "int8": export_checkpoint(
            args.checkpoint, folder / "int8.onnx", int8=True, data=args.data
        ),  # fmt: skip
        "fp32-no-atypicality": export_checkpoint(
            args.checkpoint, folder / "plain.onnx", data=args.data, atypicality_quantile=None
        ),
    }
    fp32, int8 = files["fp32"], files["int8"]
    test = load_run_dataset(Checkpoint.load(args.checkpoint), args.data).test
    images = np.ascontiguousarray(test.images[:2048])
    runs = engines(args.checkpoint, files, args.threads, args.torch_bf16, args.data)

    samples: dict[tuple[str, int], list[float]] = {(e, b): [] for e in runs for b in BATCHES}
    for round_ in range(args.rounds):
        for batch in BATCHES:
            for name, run in runs.items():
                rate = images_per_second(run, images, batch, args.seconds)
                samples[(name, batch)].append(rate)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    rate = {key: statistics.median(values) for key, values in samples.items()}

    acc32 = accuracy(fp32, test.images, test.labels)
    acc8 = accuracy(int8, test.images, test.labels)
    result = {
        "checkpoint": args.checkpoint,
        "threads": args.threads,
        "images_per_second": {f"{e}@{b}": round(r, 1) for (e, b), r in rate.items()},
        "fp32_over_torch": {b: rate[("ort-fp32", b)] / rate[("torch", b)] for b in BATCHES},
        "int8_over_fp32": {b: rate[("ort-int8", b)] / rate[("ort-fp32", b)] for b in BATCHES},
        "fp32_over_no_atypicality": {
            b: rate[("ort-fp32", b)] / rate[("ort-fp32-no-atypicality", b)] for b in BATCHES
        },
        "test_accuracy": {"ort-fp32": acc32, "ort-int8": acc8},
        "int8_accuracy_drop_points": 100 * (acc32 - acc8),
        "targets": TARGETS,
    }
    return result, rate


def report(result: dict, rate: dict) -> str:
    head = f"images/s, {result['threads']} threads (median)"
    lines = [f"{head:<30}" + "   ".join(f"batch {b:>3}" for b in BATCHES)]
    for engine in dict.fromkeys(e for e, _ in rate):  # in the order they ran
        lines.append(f"  {engine:<27} " + "   ".join(f"{rate[(engine, b)]:9.0f}" for b in BATCHES))
    for key in ("fp32_over_torch", "int8_over_fp32", "fp32_over_no_atypicality"):
        ratios = "   ".join(f"{result[key][b]:8.2f}x" for b in BATCHES)
        target = f"   (target >= {TARGETS[key]}x)" if key in TARGETS else "   (the cost)"
        lines.append(f"  {key:<27} {ratios}{target}")
    acc = result["test_accuracy"]
    lines.append(
        f"  test nearest-center accuracy: fp32 {acc['ort-fp32']:.4f}, int8 {acc['ort-int8']:.4f}"
        f" (drop {result['int8_accuracy_drop_points']:.2f} points, target <= 0.5)"
    )
    load = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(result["load_average_before"],
                     result["load_average_after"], strict=True))  # fmt: skip
    lines.append(f"  load average (1, 5, 15 min) before -> after: {load}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
