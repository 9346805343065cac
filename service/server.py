"""Start the HTTP service under uvicorn: one process or several workers, and a clean stop.

The app itself is built by app.app_from_env in every worker process, from CENTER_EMBED_*
environment variables, so what the parent decides (the model path, the threads per
worker, the Prometheus multiprocess folder) is handed down through the environment.
The parent checks everything it can before starting workers, so a bad setting, key file
or model is one `UserError` instead of an error in each worker.

The connection limits (`uvicorn_options`): header bytes (pipelined ones included) and
time, the time a peer may leave a response unread, open connections (service/protocol.py,
on uvicorn's own parser), idle keep-alive, and the graceful-shutdown time, after which
uvicorn cancels what still runs and the app answers it 503.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from center_embed.enrolment import centers_file_for
from center_embed.errors import UserError
from center_embed.service.middleware import log_config
from center_embed.service.protocol import protocol_path
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings


def load_settings() -> Settings:
    """Settings from the environment; a bad value is one line (and never echoes a key)."""
    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"CENTER_EMBED_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: "
            f"{err['msg']}"
            for err in e.errors()
        )
        raise UserError(f"bad service settings: {problems}") from None


def check_and_load_settings(model: Path, workers: int) -> Settings:
    """Validate what the workers will need and put the model and threads in the environment."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if not model.is_file():
        raise UserError(f"model not found: {model}")
    os.environ["CENTER_EMBED_MODEL"] = str(model.resolve())
    share = str(max(1, (os.cpu_count() or 1) // workers))
    if workers > 1 and "CENTER_EMBED_THREADS" not in os.environ:
        # N sessions each using every core would only fight over them.
        os.environ["CENTER_EMBED_THREADS"] = share
    if workers > 1 and "CENTER_EMBED_DECODE_THREADS" not in os.environ:
        os.environ["CENTER_EMBED_DECODE_THREADS"] = share  # and N sets of decode pools
    settings = load_settings()
    settings.keys()  # an unreadable key file fails here, not in every worker
    # one-line errors for a file that is not ours, or a runtime/precision that cannot run it
    served = ServedModel.open(model, replace(settings.runtime_options(), threads=1))
    # and for a centers file beside it that is not a valid one of this model
    served.use_centers_file(settings.centers_file or centers_file_for(model))
    return settings


def uvicorn_options(settings: Settings, http: str | type | None = None) -> dict:
    """uvicorn.Config/uvicorn.run options for the limits in `settings`. `http`: a protocol
    class instead of the guarded one named by settings.http (tests fix their limits so)."""
    return {
        "http": http or protocol_path(settings.http),
        "timeout_keep_alive": settings.keep_alive_s,
        # h11's own bound on an incomplete event (headers): ours answers 431 first
        "h11_max_incomplete_event_size": 2 * settings.max_header_bytes,
        # On SIGTERM: stop accepting, let in-flight requests finish (each is bounded by the
        # request timeout), then cancel the rest (503) and drain the batcher in the lifespan.
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }


def check_port_free(host: str, port: int) -> None:
    """A UserError when `host:port` cannot be bound (taken, or not an address here), found
    by binding it once as uvicorn will (SO_REUSEADDR), instead of failing after start-up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(f"cannot listen on {host}:{port}: {reason}; pick another --port") from None


def run_server(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    """Serve `model` until SIGTERM or Ctrl-C; in-flight requests finish first."""
    model = Path(model)
    settings = check_and_load_settings(model, workers)
    check_port_free(host, port)  # before the banner: a taken port is one error line
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="center-embed-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # /metrics sums every worker
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully; with this
    # handler that ends in exit status 0 (and our clean-up runs) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    url = f"http://{host}:{port}"
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
            host=host,
            port=port,
            workers=workers,
            log_config=log_config(log_level),
            access_log=False,  # ours is structured and carries the timings
            **uvicorn_options(settings),
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
