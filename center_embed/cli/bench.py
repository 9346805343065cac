"""`center-embed bench model.onnx`: images/s of each installed runtime × precision × batch.

    center-embed bench model.onnx --batch-sizes 1,16,64 --threads 2

Parses and calls center_embed.runtime_bench; prints one line per measurement as it comes
and, at the end, the fastest choice at the largest batch size with the flags that pick it.
"""

from __future__ import annotations

import argparse

from center_embed.cli.common import add_model_argument, add_threads_argument
from center_embed.errors import UserError


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument(
        "--batch-sizes", default="1,16,64",
        help="comma-separated batch sizes to time (default: %(default)s)",
    )  # fmt: skip
    add_threads_argument(p)
    p.add_argument(
        "--seconds", type=float, default=2.0,
        help="time spent on each measurement (default: %(default)s)",
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    from center_embed.runtime_bench import bench

    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise UserError(
            f"--batch-sizes must be integers like 1,16,64, not {args.batch_sizes!r}"
        ) from None
    print(f"{'runtime':<12} {'precision':<9} {'batch':>5} {'images/s':>10}")
    rows = bench(
        args.model, batch_sizes, args.threads, args.seconds,
        log=lambda r: print(f"{r.runtime:<12} {r.precision:<9} {r.batch_size:>5} "
                            f"{r.images_per_second:>10.0f}", flush=True),
    )  # fmt: skip
    best = max(rows, key=lambda r: r.images_per_second)  # over every batch size
    print(f"fastest: --runtime {best.runtime} --precision {best.precision}, "
          f"{best.images_per_second:.0f} images/s at batch {best.batch_size}")  # fmt: skip
    return 0
