"""`center-embed serve model.onnx --host 127.0.0.1 --port 8000 [--workers N]`.

Only where to listen and what runs the model (--runtime, --precision, which set the
settings of the same names) are flags; every other option is a CENTER_EMBED_* environment
variable declared once in service/settings.py (listed by `center-embed serve --help`).
Starting the server is center_embed.service.server's job; this module parses and calls.
"""

from __future__ import annotations

import argparse
import os

from center_embed.cli.common import add_runtime_arguments


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", help="the ONNX model to serve (written by `center-embed export`)")
    p.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument(
        "--workers", type=int, default=1,
        help="worker processes, each with its own model and 1/N of the cores (default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="JSON logs on stderr, one access line per request at info (default: info)",
    )  # fmt: skip
    add_runtime_arguments(p, from_environment=True)
    p.epilog = settings_help()


def settings_help() -> str:
    """The CENTER_EMBED_* environment variables, their meaning and defaults, for --help."""
    from center_embed.service.settings import Settings

    fields = {name: f for name, f in Settings.model_fields.items() if name != "model"}
    width = max(len(name) for name in fields)
    lines = ["environment (each CENTER_EMBED_<NAME>):"]
    for name, field in fields.items():
        description = field.description or ""
        if "(default:" not in description:  # a description may say its default itself
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list | tuple):
                default = ",".join(map(str, default))
            description += f" (default: {default if default not in (None, '') else 'none'})"
        lines.append(f"  {name.upper():<{width}}  {description}")
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    from center_embed.service.server import run_server

    # The flags are settings like any other: the environment carries them to every worker.
    for name in ("runtime", "precision"):
        if getattr(args, name) is not None:
            os.environ[f"CENTER_EMBED_{name.upper()}"] = getattr(args, name)
    run_server(
        args.model, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level
    )
    return 0
