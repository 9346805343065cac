"""Scoring throughput against the runtime's own, on the same model and batch size.

    CENTER_EMBED_CACHE=/tmp/cecache .venv/bin/python benchmarks/bench_score.py \
        --model model.onnx --data /work/shared/data/cifar10

The scorer reads the 10,000 test images from their JPEG files (`<data>/test`, recursively),
decodes them, runs the model file at the batch size given with its own default settings
(`--runtime auto --precision auto`, as `center-embed score`; workers = cores + 1, one
intra-op thread each; see center_embed/score/local.py for why) and writes Parquet. The
baselines run the same file on the same images already decoded into a uint8 array
(center_embed.data's cache), batch after batch, in this process:

- onnxruntime fp32 with its default threading (one intra-op thread per core), and with the
  scorer's threading (single-threaded calls, `workers` at once);
- the runtime and precision the scorer chose, with the scorer's threading (when that is not
  onnxruntime fp32).

Two ratios per round: the scorer against the faster run of its own runtime (target >= 0.9:
decoding and writing Parquet cost little) and against the faster onnxruntime fp32 run (what
the defaults gain over the plain runtime). All are measured in this one run, alternating,
so that a load that comes and goes (another job on the machine) weighs on each alike
(--pairing class alternates every 1,000 images). CPU milliseconds per image are printed
too: they show what decoding and writing cost even when the wall-clock figures are noisy.

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
from center_embed.score.local import default_workers, open_scoring_model, score

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
    p.add_argument("--runtime", default="auto", help="the scorer's --runtime (default: auto)")
    p.add_argument("--precision", default="auto", help="the scorer's --precision")
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


def rounds(baselines: dict[str, tuple], scorer_model, work, own: list[str], tmp: Path, args):
    """Per round, the scorer against the faster of its own runtime's baselines (`own`) and
    against the faster onnxruntime fp32 one: wall ratios, CPU ratios, the scorer's images/s."""
    ratios: dict[str, list[float]] = {"own": [], "onnxruntime": [], "own_cpu": []}
    rates = []
    for r in range(args.rounds):
        clocks = dict.fromkeys(baselines, Clock.zero())
        scoring, rows = Clock.zero(), 0
        for arrays, folder in work:
            for name, (model, calls) in baselines.items():
                clocks[name] += onnxruntime_pass(model, arrays, args.batch_size, calls)
            timed, n = scoring_pass(scorer_model, folder, tmp / "s.parquet", args)
            scoring, rows = scoring + timed, rows + n
        assert rows == sum(len(arrays) for arrays, _ in work), rows
        best_own = min((clocks[name] for name in own), key=lambda c: c.wall)
        best_ort = min((clocks[name] for name in ORT_BASELINES), key=lambda c: c.wall)
        ratios["own"].append(best_own.wall / scoring.wall)
        ratios["own_cpu"].append(best_own.cpu / scoring.cpu)
        ratios["onnxruntime"].append(best_ort.wall / scoring.wall)
        rates.append(rows / scoring.wall)
        shown = "; ".join(f"{name} {show(clock, rows)}" for name, clock in clocks.items())
        print(
            f"round {r + 1}: in process on decoded arrays: {shown}; scoring {rows} files to "
            f"Parquet {show(scoring, rows)}; ratio to its own runtime {ratios['own'][-1]:.3f}, "
            f"to onnxruntime fp32 {ratios['onnxruntime'][-1]:.3f}"
        )
    return ratios, rates


ORT_BASELINES = ("onnxruntime fp32, default threads", "onnxruntime fp32, scorer's threads")


def main() -> int:
    args = parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(args.model) if args.model else Path(tmp) / "model.onnx"
        if not args.model:
            from center_embed.export.onnx_export import export_checkpoint

            export_checkpoint(args.checkpoint, model_path)
        chosen = RuntimeOptions("cpu", args.threads, args.runtime, args.precision)
        scorer_model = open_scoring_model(model_path, chosen)  # as `center-embed score`
        workers = args.workers or default_workers()
        ort_default = OnnxModel(model_path, RuntimeOptions("cpu", 0, "onnxruntime", "fp32"))
        ort_scorer = open_scoring_model(
            model_path, RuntimeOptions("cpu", args.threads, "onnxruntime", "fp32")
        )
        baselines = {ORT_BASELINES[0]: (ort_default, 1), ORT_BASELINES[1]: (ort_scorer, workers)}
        runtime = scorer_model.runtime  # {"runtime": ..., "precision": ..., "reason": ...}
        own = list(ORT_BASELINES)
        if (runtime["runtime"], runtime["precision"]) != ("onnxruntime", "fp32"):
            own = [f"{runtime['runtime']} {runtime['precision']}, scorer's threads"]
            baselines[own[0]] = (scorer_model, workers)
        size = scorer_model.info.input_size[0]
        dataset = load_dataset(args.data, size)
        images = np.ascontiguousarray(dataset.test.images)
        work = pairs(args, images, np.asarray(dataset.test.labels), dataset.class_names)
        info = scorer_model.info
        print(
            f"model {model_path.name}: {info.embedding_dim}-d, {info.num_classes} classes, "
            f"{size}px; scorer on {runtime['runtime']} {runtime['precision']} "
            f"({runtime.get('reason', '')}); {len(images)} test images, batch size "
            f"{args.batch_size}, pairing {args.pairing}; {os.cpu_count()} cores, scorer "
            f"{workers} workers x {args.threads} thread; load average "
            f"{os.getloadavg()[0]:.1f} at start"
        )
        for model, _ in baselines.values():
            model.run(images[: args.batch_size])  # warm-up: first-run allocations
        ratios, rates = rounds(baselines, scorer_model, work, own, Path(tmp), args)
    overall = statistics.median(ratios["own"])
    print(
        f"median ratio to its own runtime {overall:.3f} (target >= {TARGET}); to onnxruntime "
        f"fp32 {statistics.median(ratios['onnxruntime']):.3f}; median CPU-time ratio "
        f"{statistics.median(ratios['own_cpu']):.3f}; load average {os.getloadavg()[0]:.1f} "
        f"at end"
    )
    results = {"model": str(model_path), "images": len(images), "batch_size": args.batch_size,
               "workers": workers, "threads": args.threads, "pairing": args.pairing,
               "runtime": runtime, "ratios": ratios["own"], "cpu_ratios": ratios["own_cpu"],
               "median_ratio": overall, "median_cpu_ratio": statistics.median(ratios["own_cpu"]),
               "ratios_to_onnxruntime_fp32": ratios["onnxruntime"],
               "median_ratio_to_onnxruntime_fp32": statistics.median(ratios["onnxruntime"]),
               "target": TARGET, "images_per_second": statistics.median(rates),
               "rounds_images_per_second": rates}  # fmt: skip
    write_results("score", results, args.json)
    return 0 if overall >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
