"""The `center-embed` command: parses arguments and calls library functions.

Each subcommand lives in a module that is imported only when that subcommand runs, so
`center-embed --help` is instant and `center-embed serve` never imports torch. A module
named in COMMANDS defines `add_<name>_arguments(parser)` and `run_<name>(args) -> int`.

A `UserError` is printed as one line and exits with status 1; a bad flag exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from center_embed import __version__
from center_embed.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("center_embed.cli", "train a model with softmax + center loss"),
    "eval": ("center_embed.cli", "test-split metrics of a checkpoint"),
    "export": ("center_embed.cli.export", "write a checkpoint as one verified ONNX model"),
    "verify": (
        "center_embed.cli.export",
        "accuracy of an ONNX model on a dataset, through onnxruntime",
    ),
    "inspect": (
        "center_embed.cli.export",
        "print an ONNX model's classes, dims, threshold, provenance",
    ),
    "serve": ("center_embed.cli.serve", "serve an ONNX model over HTTP"),
    "score": ("center_embed.score.local", "score a folder or list of images into Parquet"),
    "report": ("center_embed.report.build", "an evaluation report (HTML, JSON, plots) of a model"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="center-embed",
        description="Image embeddings with center loss: train, export to ONNX, serve, score.",
    )
    parser.add_argument("--version", action="version", version=f"center-embed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    run = getattr(importlib.import_module(COMMANDS[args.command][0]), f"run_{args.command}")
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 130 if type(e).__name__ == "TrainingInterrupted" else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = {"torch": "train", "onnx": "train", "onnxruntime": "cpu", "fastapi": "serve"}
        name = (e.name or "").split(".")[0]
        if name in extra:
            print(
                f"error: {name} is not installed; pip install 'center-embed[{extra[name]}]'",
                file=sys.stderr,
            )
            return 1
        raise


# --------------------------------------------------------------------------- train


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from center_embed.config import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of options")
    p.add_argument("--config", metavar="TOML", help="a TOML file of options")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one option, e.g. --set loss.center_weight=0.01 (repeatable)",
    )  # fmt: skip
    p.add_argument("--data", help="dataset: image folder or CIFAR-10 archive (data.path)")
    p.add_argument("--classes", help="comma-separated class subset (data.classes)")
    p.add_argument(
        "--download", action="store_true",
        help="first fetch CIFAR-10 into --data if it is not there (official archive, md5 checked)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default)")
    p.add_argument(
        "--resume", metavar="RUN", help="continue the run in this folder from its last.pt"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")


def run_train(args: argparse.Namespace) -> int:
    from center_embed.config import load_config

    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.classes is not None:
        if not args.classes.strip(" ,"):
            raise UserError("--classes expects comma-separated class names, e.g. cat,dog")
        overrides.append(f"data.classes={args.classes}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.preset, args.config, overrides)
    out = Path(args.resume) if args.resume else Path(args.out)
    if out.is_file():  # `--resume runs/x/last.pt` means the folder
        out = out.parent
    if args.download:
        from center_embed.download import download_cifar10

        quiet = int(os.environ.get("RANK", "0")) != 0
        download_cifar10(cfg.data.path, log=(lambda _: None) if quiet else print)

    from center_embed.train import train

    result = train(cfg, out, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"saved {out / 'best.pt'} and {out / 'last.pt'}")
    if not args.no_eval:
        _evaluate_and_record(out / "best.pt", result)
    return 0


def _evaluate_and_record(checkpoint: Path, train_result: dict) -> None:
    """Evaluate on the test split; store the figures in the checkpoint and eval.json."""
    from center_embed.checkpoint import load_checkpoint, save_checkpoint
    from center_embed.evaluate import evaluate_checkpoint, format_table, write_json

    result = evaluate_checkpoint(checkpoint)
    print(format_table(result))
    write_json(result, checkpoint.parent / "eval.json")
    ckpt = load_checkpoint(checkpoint)
    ckpt["metrics"]["test"] = {k: v for k, v in result.items() if k not in ("checkpoint",)}
    save_checkpoint(checkpoint, ckpt)
    print(f"wrote {checkpoint.parent / 'eval.json'}")


# --------------------------------------------------------------------------- eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt checkpoint written by train")
    p.add_argument("--data", help="dataset to take the test split from (default: the run's)")
    p.add_argument("--out", help="JSON file to write (default: eval.json beside the checkpoint)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", type=int, choices=[0, 1, 2], help="test-time augmentation level")


def run_eval(args: argparse.Namespace) -> int:
    from center_embed.evaluate import evaluate_checkpoint, format_table, write_json

    result = evaluate_checkpoint(args.checkpoint, args.data, args.device, args.tta)
    print(format_table(result))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval.json"
    write_json(result, out)
    print(f"wrote {out}")
    return 0
