"""The `center-embed` command: the top layer, which parses arguments and calls the library.

COMMANDS is the registry: each subcommand names its help line and the adapter module of
this package that handles it (train.py, export.py, serve.py, score.py, report.py,
bench.py). An
adapter module defines `add_<command>_arguments(parser)` and `run_<command>(args) -> int`
for each command it handles, and is imported only when one of its commands runs, so
`center-embed --help` is instant and `center-embed serve` never imports torch. Only this
package addresses other modules by name; no library module imports the CLI.

Exit status: 0 on success; a `UserError` is printed as one line (`error: ...`) and exits
with 1, as does a missing optional dependency (with the extra to install); a bad flag
exits with 2; Ctrl-C (and an interrupted training run) exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from center_embed import __version__
from center_embed.errors import UserError, install_hint


@dataclass(frozen=True)
class Command:
    help: str
    adapter: str  # a module of center_embed.cli

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.adapter}")


COMMANDS: dict[str, Command] = {
    "train": Command("train a model with softmax + center loss", "train"),
    "eval": Command("test-split metrics of a checkpoint", "train"),
    "export": Command("write a checkpoint as one verified ONNX model", "export"),
    "verify": Command("accuracy of an ONNX model on a dataset, through onnxruntime", "export"),
    "inspect": Command("print an ONNX model's classes, dims, threshold, provenance", "export"),
    "triton": Command("write an ONNX model as a Triton model repository", "export"),
    "enroll": Command("add or remove classes of an ONNX model without retraining", "enroll"),
    "serve": Command("serve an ONNX model over HTTP", "serve"),
    "score": Command("score a folder or list of images into Parquet", "score"),
    "report": Command("an evaluation report (HTML, JSON, plots) of a model", "report"),
    "bench": Command("images/s of each installed runtime x precision x batch size", "bench"),
}

# A missing import of these top-level packages means an optional extra is not installed.
# Where a command needs a package for less than its usual extra: enrolment writes ONNX with
# the onnx package alone (`enrol`), which spares a serving box torch.
EXTRA_FOR_COMMAND_PACKAGE = {("enroll", "onnx"): "enrol"}
EXTRA_FOR_PACKAGE = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "onnxruntime": "cpu",
    "openvino": "openvino",
    "fastapi": "serve",
    "uvicorn": "serve",
    "pydantic": "serve",
    "pydantic_settings": "serve",
    "prometheus_client": "serve",
    "multipart": "serve",
    "httpx": "serve",
    "pyarrow": "score",
    "matplotlib": "score",
    "ray": "ray",
    "tritonclient": "triton",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s own arguments are added (its adapter is imported)."""
    parser = argparse.ArgumentParser(
        prog="center-embed",
        description="Image embeddings with center loss: train, export to ONNX, serve, score.",
    )
    parser.add_argument("--version", action="version", version=f"center-embed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        if name == command:
            getattr(entry.load(), f"add_{name}_arguments")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return parse_and_run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        name = (e.name or "").split(".")[0]
        if name not in EXTRA_FOR_PACKAGE:
            raise
        command = next((a for a in argv if not a.startswith("-")), None)
        extra = EXTRA_FOR_COMMAND_PACKAGE.get((command, name), EXTRA_FOR_PACKAGE[name])
        message = f"{name} is not installed; {install_hint(extra)}"
        print(f"error: {message}", file=sys.stderr)
        return 1


def parse_and_run(argv: list[str]) -> int:
    """Parse `argv` (importing only the named command's adapter) and run the command."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = getattr(
        COMMANDS[args.command].load(), f"run_{args.command}"
    )
    return run(args)
