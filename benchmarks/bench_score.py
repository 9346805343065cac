"""Scoring throughput against onnxruntime's own, on the same model and batch size.

    CENTER_EMBED_CACHE=/tmp/cecache .venv/bin/python benchmarks/bench_score.py \
        --model model.onnx --data /work/shared/data/cifar10

The baseline is onnxruntime alone on the test split already decoded into a uint8 array
(center_embed.data's cache), batch after batch, with onnxruntime's default threading (one
intra-op thread per core). The scorer reads the same 10,000 images from their JPEG files
(`<data>/test`, recursively), decodes, runs the same model file at the same batch size with
its own default settings (workers = cores + 1, one intra-op thread each; see
service/score.py for why) and writes Parquet. A second baseline runs onnxruntime on the
decoded arrays with the scorer's threading (single-threaded calls, `workers` at once), so
that the ratio cannot come from a better use of onnxruntime alone: the ratio printed is
against the faster of the two baselines.

All are measured in this one run, alternating, so that a load that comes and goes (another
job on the machine) weighs on each alike (--pairing class alternates every 1,000 images);
the target is a ratio of at least 0.9. CPU milliseconds per image are printed too: they
show what decoding and writing cost even when the wall-clock figures are noisy.

Without --model, --checkpoint is exported to a temporary ONNX file first (needs torch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import add_json_argument, write_results

from center_embed.data import load_dataset
from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.score.local import default_workers, score

TARGET = 0.9


@dataclass
class Clock:
    """Wall seconds, and CPU seconds of this process (all its threads).

    CPU time per image hardly moves when another job shares the cores, so it shows what
    decoding and writing cost even when the wall-clock ratio is noisy."""

    wall: float = 0.0
    cpu: float = 0.0

    @classmethod
    def zero(cls) -> Clock:
        return cls()

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stop(self) -> Clock:
        return Clock(time.perf_counter() - self.wall, time.process_time() - self.cpu)

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


def onnxruntime_pass(model: OnnxModel, images: np.ndarray, batch_size: int, calls: int) -> Clock:
    """`calls` batches at once (from as many threads), or one after another if 1."""
    starts = range(0, len(images), batch_size)
    with Clock() as clock:
        if calls == 1:
            for i in starts:
                model.run(images[i : i + batch_size])
        else:
            with ThreadPoolExecutor(calls) as pool:
                list(pool.map(lambda i: model.run(images[i : i + batch_size]), starts))
    return clock.stop()


def scoring_pass(model: OnnxModel, folder: Path, out: Path, args) -> tuple[Clock, int]:
    with Clock() as clock:
        summary = score(
            model,
            folder,
            out,
            batch_size=args.batch_size,
            workers=args.workers,
            overwrite=True,
            progress=False,
        )
    if summary.failed:
        raise SystemExit(f"{summary.failed} images of {folder} failed to decode")
    return clock.stop(), summary.rows


def show(clock: Clock, images: int) -> str:
    return f"{images / clock.wall:5.0f} images/s ({1000 * clock.cpu / images:.3f} CPU ms/image)"


def pairs(args, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """(decoded images, folder of the same images) to time one after the other."""
    test = Path(args.data) / "test"
    if args.pairing == "whole":
        return [(images, test)]
    return [(images[labels == j], test / name) for j, name in enumerate(class_names)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="an exported ONNX model")
    p.add_argument("--checkpoint", default="/tmp/bench/cpu1/best.pt", help="used without --model")
    p.add_argument("--data", default="/work/shared/data/cifar10", help="has test/<class>/*.jpg")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="scorer workers (0: its default)")
    p.add_argument("--threads", type=int, default=1, help="scorer's intra-op threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--pairing",
        choices=["whole", "class"],
        default="whole",
        help="whole: each round times the 10,000 images once each way; class: it alternates "
        "class folder by class folder (1,000 images), which cancels a load that changes "
        "within a round, at the price of ten scoring jobs' start-up and merge",
    )
    add_json_argument(p)
    return p.parse_args()


def rounds(model, scorer_model, work, workers: int, tmp: Path, args):
    """Per round, the scorer against the faster onnxruntime baseline: (wall, CPU) ratios,
    and the scorer's own images/s."""
    ratios, cpu_ratios, rates = [], [], []
    for r in range(args.rounds):
        default, same, scoring, rows = Clock.zero(), Clock.zero(), Clock.zero(), 0
        for arrays, folder in work:
            default += onnxruntime_pass(model, arrays, args.batch_size, 1)
            same += onnxruntime_pass(scorer_model, arrays, args.batch_size, workers)
            timed, n = scoring_pass(scorer_model, folder, tmp / "s.parquet", args)
            scoring, rows = scoring + timed, rows + n
        assert rows == sum(len(arrays) for arrays, _ in work), rows
        best = min(default, same, key=lambda c: c.wall)
        ratios.append(best.wall / scoring.wall)
        rates.append(rows / scoring.wall)
        cpu_ratios.append(best.cpu / scoring.cpu)
        print(
            f"round {r + 1}: onnxruntime on decoded arrays, default threads "
            f"{show(default, rows)}, scorer's threads {show(same, rows)}; scoring {rows} "
            f"files to Parquet {show(scoring, rows)}; ratio to the faster {ratios[-1]:.3f}"
        )
    return ratios, cpu_ratios, rates


def main() -> int:
    args = parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(args.model) if args.model else Path(tmp) / "model.onnx"
        if not args.model:
            from center_embed.export.onnx_export import export_checkpoint

            export_checkpoint(args.checkpoint, model_path)
        model = OnnxModel(model_path, RuntimeOptions(device="cpu"))  # onnxruntime's defaults
        scorer_model = OnnxModel(
            model_path, RuntimeOptions(device="cpu", threads=args.threads)
        )  # the scorer's settings
        workers = args.workers or default_workers()
        size = model.info.input_size[0]
        dataset = load_dataset(args.data, size)
        images = np.ascontiguousarray(dataset.test.images)
        work = pairs(args, images, np.asarray(dataset.test.labels), dataset.class_names)
        info = model.info
        print(
            f"model {model_path.name}: {info.embedding_dim}-d, {info.num_classes} classes, "
            f"{size}px, {model.provider}; {len(images)} test images, batch size "
            f"{args.batch_size}, pairing {args.pairing}; {os.cpu_count()} cores, scorer "
            f"{workers} workers x {args.threads} thread; load average "
            f"{os.getloadavg()[0]:.1f} at start"
        )
        for m in (model, scorer_model):
            m.run(images[: args.batch_size])  # warm-up: first-run allocations
        ratios, cpu_ratios, rates = rounds(model, scorer_model, work, workers, Path(tmp), args)
    overall = statistics.median(ratios)
    print(
        f"median ratio {overall:.3f} (target >= {TARGET}); median CPU-time ratio "
        f"{statistics.median(cpu_ratios):.3f}; load average {os.getloadavg()[0]:.1f} "
        f"at end"
    )
    results = {"model": str(model_path), "images": len(images), "batch_size": args.batch_size,
               "workers": workers, "threads": args.threads, "pairing": args.pairing,
               "ratios": ratios, "cpu_ratios": cpu_ratios, "median_ratio": overall,
               "median_cpu_ratio": statistics.median(cpu_ratios), "target": TARGET,
               "images_per_second": statistics.median(rates),
               "rounds_images_per_second": rates}  # fmt: skip
    write_results("score", results, args.json)
    return 0 if overall >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
