"""Flags that several commands share, each declared once with one default and one help.

Every adapter adds a shared flag through these functions, so `--device` means the same
thing, and defaults to the same value, in `eval`, `score` and `report` alike.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from center_embed.errors import UserError

DEFAULT_DEVICE = "auto"
DEFAULT_THREADS = 0  # onnxruntime's own choice; `score` turns it into 1 per batch
DEFAULT_BATCH_SIZE = 256
SPLITS = ("test", "train")
ENGINES = ("local", "ray")


def add_device_argument(p: argparse.ArgumentParser, *, config_key: str | None = None) -> None:
    """`--device`. With `config_key`, the flag overrides that config option when given."""
    help_text = "auto, cpu, cuda or cuda:N"
    if config_key:
        # train's device is a config option: an absent flag leaves the config's value alone
        p.add_argument("--device", help=f"{help_text} (default: {config_key}, which is auto)")
    else:
        p.add_argument("--device", default=DEFAULT_DEVICE, help=f"{help_text} (default: auto)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS,
        help="runtime intra-op threads (default 0: the runtime's choice, one per core; "
        "in score, 1 per batch)",
    )  # fmt: skip


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    """`--engine`: WHERE the work runs (this process or a Ray cluster); not what executes
    the graph (that is --runtime)."""
    p.add_argument(
        "--engine", choices=ENGINES, default=ENGINES[0],
        help="local: this process (default); ray: Ray Data, on a local Ray or a cluster "
        "(pip install '.[ray]')",
    )  # fmt: skip


def add_runtime_arguments(p: argparse.ArgumentParser, *, from_environment: bool = False) -> None:
    """`--runtime` and `--precision` (center_embed.runtime.choose_runtime says what they do).

    from_environment (serve, score): the flags are absent unless given, so the settings
    CENTER_EMBED_RUNTIME / CENTER_EMBED_PRECISION decide, else auto (the fastest runtime
    here, checked by the file's self-check); otherwise (verify) onnxruntime, the export's
    own reference."""
    from center_embed.runtime import (
        DEFAULT_PRECISION,
        DEFAULT_RUNTIME,
        PRECISION_CHOICES,
        RUNTIME_CHOICES,
        SERVING_DEFAULT_RUNTIME,
    )

    runtime = SERVING_DEFAULT_RUNTIME if from_environment else DEFAULT_RUNTIME
    where = "CENTER_EMBED_{}, else " if from_environment else ""
    p.add_argument(
        "--runtime", choices=RUNTIME_CHOICES,
        default=None if from_environment else runtime,
        help="inference runtime; auto: OpenVINO where installed (CPU), else onnxruntime; "
        "another runtime or precision than the export's own is checked against the file's "
        f"self-check first (default: {where.format('RUNTIME')}{runtime})",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=PRECISION_CHOICES,
        default=None if from_environment else DEFAULT_PRECISION,
        help="arithmetic precision; auto: bf16 under OpenVINO on a CPU with AVX512-BF16 or "
        "AMX, else the file's own (fp32, or int8 for an --int8 export) "
        f"(default: {where.format('PRECISION')}{DEFAULT_PRECISION})",
    )  # fmt: skip


def runtime_options(args: argparse.Namespace):
    """The `RuntimeOptions` the flags ask for: --device (cpu where a command has none),
    --threads, --runtime, --precision."""
    from center_embed.runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, RuntimeOptions

    runtime = getattr(args, "runtime", DEFAULT_RUNTIME)
    precision = getattr(args, "precision", DEFAULT_PRECISION)
    return RuntimeOptions(
        device=getattr(args, "device", "auto"),
        threads=getattr(args, "threads", DEFAULT_THREADS),
        runtime=runtime or environment_runtime("RUNTIME"),
        precision=precision or environment_runtime("PRECISION"),
    )


def environment_runtime(name: str) -> str:
    """CENTER_EMBED_RUNTIME / _PRECISION, as serve reads them, else serve's and score's
    defaults (auto)."""
    from center_embed.runtime import DEFAULT_PRECISION, SERVING_DEFAULT_RUNTIME

    default = SERVING_DEFAULT_RUNTIME if name == "RUNTIME" else DEFAULT_PRECISION
    return os.environ.get(f"CENTER_EMBED_{name}", "").strip().lower() or default


def add_data_argument(p: argparse.ArgumentParser, default: str) -> None:
    """`--data`; `default` says where the dataset comes from when the flag is absent."""
    p.add_argument(
        "--data", metavar="DATA",
        help=f"dataset: an image folder or a CIFAR-10 archive (default: {default})",
    )  # fmt: skip


def add_split_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=SPLITS, default="test", help="(default: test)")


def add_batch_size_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"{help_text} (default: {DEFAULT_BATCH_SIZE})",
    )  # fmt: skip


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an ONNX model written by `center-embed export`")


def add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt checkpoint written by `center-embed train`")


# One overwrite rule for every writer: an output that exists is an error unless --overwrite
# (what `score` always did); a silent overwrite of a verified model or a report loses work.


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    """`--overwrite`: replace an existing output instead of refusing."""
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the output if it exists (without it, an existing output is an error)",
    )  # fmt: skip


def refuse_existing(path: str | Path | None, overwrite: bool) -> None:
    """A UserError when `path` exists and `overwrite` was not given."""
    if path is not None and Path(path).exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
