"""`center-embed train | eval`: parse arguments, call the training loop and the evaluator.

torch is imported inside `run_train` and `run_eval` only, so listing the commands stays
instant. Under torchrun every process runs `run_train`; only rank 0 reports.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from center_embed.cli.common import (
    add_checkpoint_argument,
    add_data_argument,
    add_device_argument,
    add_overwrite_argument,
    refuse_existing,
)
from center_embed.errors import UserError

if TYPE_CHECKING:  # the type only: the config module loads when a command runs
    from center_embed.training.config import Config

# --------------------------------------------------------------------------- train


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from center_embed.training.config import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of options")
    p.add_argument("--config", metavar="TOML", help="a TOML file of options")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one option, e.g. --set loss.center_weight=0.01 (repeatable)",
    )  # fmt: skip
    add_data_argument(p, default="the config's data.path")
    p.add_argument("--classes", help="comma-separated class subset (data.classes)")
    p.add_argument(
        "--download", action="store_true",
        help="first fetch CIFAR-10 into --data if it is not there (official archive, md5 checked)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default)")
    p.add_argument(
        "--resume", metavar="RUN", help="continue the run in this folder from its last.pt"
    )
    add_device_argument(p, config_key="train.device")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")


def run_train(args: argparse.Namespace) -> int:
    from center_embed.training.config import load_config

    cfg = load_config(args.preset, args.config, _config_overrides(args))
    out = Path(args.resume) if args.resume else Path(args.out)
    if out.is_file():  # `--resume runs/x/last.pt` means the folder
        out = out.parent
    is_reporter = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if args.download:
        from center_embed.training.download import download_cifar10

        download_cifar10(cfg.data.path, log=print if is_reporter else (lambda _: None))

    from center_embed.training.train import train

    chosen = args.data or args.config or any(o.startswith("data.path=") for o in args.set)
    result = train(cfg, out, resume=bool(args.resume), preset=args.preset,
                   default_data=not chosen)  # fmt: skip
    if not is_reporter:
        return 0
    print(f"saved {out / 'best.pt'} and {out / 'last.pt'}")
    if not args.no_eval and _has_test_split(cfg):  # train said so in one line otherwise
        _evaluate_and_record(out / "best.pt", result)
    return 0


def _has_test_split(cfg: Config) -> bool:
    from center_embed.data import load_dataset

    data = cfg.data
    return len(load_dataset(data.path, data.image_size, data.cache_dir, data.on_bad_image).test) > 0


def _config_overrides(args: argparse.Namespace) -> list[str]:
    """The `--set` options plus the flags that are shorthands for config options."""
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.classes is not None:
        if not args.classes.strip(" ,"):
            raise UserError("--classes expects comma-separated class names, e.g. cat,dog")
        overrides.append(f"data.classes={args.classes}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return overrides


def _evaluate_and_record(checkpoint: Path, train_result: dict) -> None:
    """Evaluate on the test split; store the figures in the checkpoint and eval.json."""
    from center_embed.training.checkpoint import load_checkpoint, save_checkpoint
    from center_embed.training.evaluate import evaluate_checkpoint, format_table, write_json

    result = evaluate_checkpoint(checkpoint)
    print(format_table(result))
    write_json(result, checkpoint.parent / "eval.json")
    ckpt = load_checkpoint(checkpoint)
    ckpt["metrics"]["test"] = {k: v for k, v in result.items() if k not in ("checkpoint",)}
    save_checkpoint(checkpoint, ckpt)
    print(f"wrote {checkpoint.parent / 'eval.json'}")


# --------------------------------------------------------------------------- eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    add_data_argument(p, default="the run's, as the checkpoint records it")
    p.add_argument(
        "--out",
        help="JSON file to write (default: the run's eval.json beside the checkpoint, which "
        "is the run's own record and always refreshed)",
    )
    add_device_argument(p)
    p.add_argument("--tta", type=int, choices=[0, 1, 2], help="test-time augmentation level")
    add_overwrite_argument(p)


def run_eval(args: argparse.Namespace) -> int:
    from center_embed.training.evaluate import evaluate_checkpoint, format_table, write_json

    refuse_existing(args.out, args.overwrite)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.device, args.tta)
    print(format_table(result))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval.json"
    write_json(result, out)
    print(f"wrote {out}")
    return 0
