"""`center-embed report`: parse arguments, call center_embed.report.build.build_report.

The report needs torch (its retrieval metrics) and matplotlib; both are imported only
when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from center_embed.cli.common import (
    add_batch_size_argument,
    add_data_argument,
    add_device_argument,
    add_model_argument,
    add_overwrite_argument,
    add_split_argument,
    add_threads_argument,
)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_data_argument(p, default="the one the model's metadata records")
    p.add_argument(
        "--run",
        help="the run folder (metrics.jsonl, eval.json) for training curves and softmax accuracy",
    )
    p.add_argument("--out", default="report", help="folder to write (default: report)")
    add_split_argument(p)
    add_batch_size_argument(p, "images per inference call")
    p.add_argument(
        "--max-points", type=int, default=5000, help="test images drawn in the 2-D figure"
    )
    add_device_argument(p)
    add_threads_argument(p)
    add_overwrite_argument(p)


def run_report(args: argparse.Namespace) -> int:
    from center_embed.report.build import build_report

    report = build_report(
        args.model,
        args.out,
        args.data,
        args.run,
        split=args.split,
        batch_size=args.batch_size,
        max_points=args.max_points,
        device=args.device,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    m = report["onnx"]
    print(
        f"{report['data']['images']} {report['data']['split']} images: nearest-center accuracy "
        f"{m['nearest_center_accuracy']:.4f}, precision@1 {m['precision_at_1']:.4f}, "
        f"MAP@R {m['map_at_r']:.4f}, intra/inter {m['intra_inter_ratio']:.4f}"
    )
    if report["softmax"]:
        print(
            f"softmax accuracy {report['softmax']['softmax_accuracy']:.4f} "
            f"(from {report['softmax']['source']})"
        )
    print(f"wrote {Path(args.out) / 'index.html'} and {Path(args.out) / 'metrics.json'}")
    return 0
