"""`center-embed serve model.onnx --host 127.0.0.1 --port 8000 [--workers N]`.

Only where to listen is a flag; every other option is a CENTER_EMBED_* environment
variable declared once in service/settings.py (listed by `center-embed serve --help`).
Nothing heavy is imported until the command runs, and nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from center_embed.errors import UserError


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
    p.epilog = settings_help()


def settings_help() -> str:
    from center_embed.service.settings import Settings

    lines = ["environment (each CENTER_EMBED_<NAME>):"]
    for name, field in Settings.model_fields.items():
        if name == "model":
            continue
        default = field.get_default(call_default_factory=True)
        shown = "none" if default in (None, []) else default
        lines.append(f"  {name.upper():<16} {field.description} (default: {shown})")
    return "\n".join(lines)


def load_settings():
    """Settings from the environment; a bad value is one line (and never echoes a key)."""
    from pydantic import ValidationError

    from center_embed.service.settings import Settings

    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"CENTER_EMBED_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: "
            f"{err['msg']}"
            for err in e.errors()
        )
        raise UserError(f"bad service settings: {problems}") from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from center_embed.service.middleware import log_config
    from center_embed.service.served_model import ServedModel

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    model = Path(args.model)
    if not model.is_file():
        raise UserError(f"model not found: {model}")
    os.environ["CENTER_EMBED_MODEL"] = str(model.resolve())
    if args.workers > 1 and "CENTER_EMBED_THREADS" not in os.environ:
        # N sessions each using every core would only fight over them.
        os.environ["CENTER_EMBED_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    settings = load_settings()
    settings.keys()  # an unreadable key file fails here, not in every worker
    ServedModel.open(model, settings.device, 1)  # one-line errors for a file that is not ours

    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="center-embed-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # /metrics sums every worker
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully; with this
    # handler that ends in exit status 0 (and our clean-up runs) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    url = f"http://{args.host}:{args.port}"
    print(
        f"serving {model} at {url}  (docs: {url}/docs)\n"
        f"try: curl -F files=@image.jpg {url}/v1/classify",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(
            "center_embed.service.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=log_config(args.log_level),
            access_log=False,  # ours is structured and carries the timings
            # On SIGTERM: stop accepting, let in-flight requests finish (each is bounded
            # by the request timeout), then drain the batcher in the lifespan shutdown.
            timeout_graceful_shutdown=math.ceil(settings.timeout_s) + 5,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
