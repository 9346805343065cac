"""`center-embed score`: parse arguments, call center_embed.score.local.score, print a summary.

Ctrl-C or SIGTERM stops after the last whole part file and says how to resume. Imports
nothing heavy at module level, and nothing here imports torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from center_embed.cli.common import (
    add_batch_size_argument,
    add_device_argument,
    add_engine_argument,
    add_model_argument,
    add_runtime_arguments,
    add_threads_argument,
    runtime_options,
)
from center_embed.errors import UserError, install_hint

if TYPE_CHECKING:
    from center_embed.score.local import ScoreSummary


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument(
        "input",
        help="a folder of images (searched recursively), a text file of image paths "
        "(one a line; relative to the file's folder), or a CIFAR-10 archive or batch folder",
    )
    p.add_argument(
        "--out", required=True,
        help="Parquet file to write (with --format npy: a folder of .npy arrays)",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=["parquet", "npy"], default="parquet", dest="fmt",
        help="parquet (default), or npy: a folder of .npy arrays plus rows.jsonl (ids, errors)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted run into the same --out, skipping what it wrote",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_batch_size_argument(p, "images per inference call (memory grows with batch size x workers)")
    p.add_argument(
        "--workers", type=int, default=0,
        help="batches decoded and run at once, one thread each (0: one more than the cores)",
    )  # fmt: skip
    add_threads_argument(p)
    add_device_argument(p)
    add_runtime_arguments(p, from_environment=True)
    p.add_argument(
        "--row-group-size", type=int, default=None,
        help="rows per Parquet row group; also how much an interruption can lose (default "
        f"8192; with --engine ray: rows per input block, default {RAY_ROWS_PER_BLOCK})",
    )  # fmt: skip
    p.add_argument(
        "--split", choices=["train", "test", "all"],
        help="which split of a CIFAR-10 input to score (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--all-files", action="store_true",
        help="in a folder, try every file instead of only image extensions",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--centers", metavar="FILE",
        help="score against a service's centers file (<model>.centers.npz: the classes "
        "enrolled over HTTP) instead of the model's own classes (--engine local)",
    )  # fmt: skip
    add_engine_argument(p)
    ray = p.add_argument_group("--engine ray (--out is then a folder: a Parquet dataset)")
    ray.add_argument(
        "--address", default=None,
        help="the Ray cluster: auto (the one this machine belongs to), ray://host:10001, ... "
        "(default: RAY_ADDRESS, else a new local Ray)",
    )  # fmt: skip
    ray.add_argument(
        "--actors", type=int, default=0,
        help="inference actors, one onnxruntime session each (default 0: one per CPU, or "
        "per GPU with --device cuda)",
    )  # fmt: skip


RAY_ROWS_PER_BLOCK = 2048
LOCAL_ROW_GROUP_SIZE = 8192


def run_score(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return _run_score_on_ray(args)
    from center_embed.score.local import score
    from center_embed.score.sources import DatasetSource, open_source

    source = open_source(args.input, args.split or "all", args.all_files)
    if args.split and not isinstance(source, DatasetSource):
        raise UserError("--split applies to a CIFAR-10 archive input only")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as Ctrl-C does
    try:
        summary = score(
            args.model,
            source,
            args.out,
            fmt=args.fmt,
            batch_size=args.batch_size,
            workers=args.workers,
            resume=args.resume,
            overwrite=args.overwrite,
            row_group_size=args.row_group_size or LOCAL_ROW_GROUP_SIZE,
            progress=not args.no_progress,
            options=runtime_options(args),
            centers=args.centers,
        )
    except KeyboardInterrupt:
        partial = Path(args.out).with_name(Path(args.out).name + ".partial")
        print(
            f"interrupted: the rows written so far are kept in {partial}; run the same "
            f"command with --resume to finish",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_score_summary(summary))
    return 0


def _run_score_on_ray(args: argparse.Namespace) -> int:
    """--engine ray: the same rows, as a Parquet dataset folder (center_embed/score/ray/)."""
    if args.fmt != "parquet" or args.split:
        raise UserError("--engine ray writes Parquet from image files: no --format npy, --split")
    if args.centers:
        raise UserError(
            "--centers works with --engine local; or bake the file into a model with "
            "`center-embed enroll MODEL --centers FILE --out NEW.onnx`"
        )
    options = runtime_options(args)
    if options.runtime != "onnxruntime" or options.precision != "auto":
        raise UserError(
            "--engine ray runs onnxruntime at the file's own precision in its actors; "
            "--runtime and --precision choose for --engine local"
        )
    from center_embed.score.ray import score_on_ray

    try:
        import ray  # noqa: F401  (the optional extra; main() names it when missing)
    except ModuleNotFoundError as e:
        raise UserError(f"--engine ray needs Ray; {install_hint('ray')}") from e
    summary = score_on_ray(
        args.model,
        args.input,
        args.out,
        address=args.address,
        options=options,
        actors=args.actors,
        batch_size=args.batch_size,
        rows_per_block=args.row_group_size or RAY_ROWS_PER_BLOCK,
        resume=args.resume,
        overwrite=args.overwrite,
        all_files=args.all_files,
        progress=not args.no_progress,
    )
    print("ran onnxruntime at the file's own precision in the Ray actors")
    print(format_score_summary(summary))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_score_summary(s: ScoreSummary) -> str:
    """What a scoring run did: images, speed, rows written, and the first failures."""
    if s.scored == 0 and s.resumed_from == s.rows:
        return f"{s.out} is complete ({s.rows} rows); nothing to do"
    lines = [
        f"scored {s.scored} images in {s.seconds:.1f} s ({s.images_per_second:.0f} images/s)"
        + (f", after {s.resumed_from} written before" if s.resumed_from else ""),
        f"wrote {s.out}: {s.rows} rows, {s.failed} failed"
        + (f", {plural(s.skipped, 'file')} skipped as not images" if s.skipped else ""),
    ]
    if s.runtime:
        r = s.runtime
        lines.insert(0, f"ran {r['runtime']} {r['precision']} on {r['provider']} ({r['reason']})")
    for image_id, error in s.failures:
        lines.append(f"  failed: {image_id}: {error}")
    if s.failed > len(s.failures):
        lines.append(f"  ... {s.failed - len(s.failures)} more (rows with a non-null error)")
    return "\n".join(lines)
