"""Per-request observability: Prometheus counters and latency, and one JSON access-log line.

A pure ASGI middleware (no response buffering). The route template, not the raw path, labels
the metrics, so a scan of random URLs cannot explode their cardinality. Request headers are
never logged (they may carry an API key), and the path is logged cut to MAX_LOGGED_PATH
characters with control characters escaped (a 64 KB path is not a 64 KB log line).

It is also the last word on a request that is cancelled before it answered (uvicorn cancels
what is still running when its graceful-shutdown time is over): such a request gets a 503
JSON `shutting_down` instead of uvicorn's plain-text 500.

A request whose connection the edge (service/protocol.py) aborted under it, or that the
peer closed before its answer was out, is logged and counted with status "aborted" (and
the app's status as `app_status`), never as the status nobody received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

from center_embed.service.error_codes import ErrorCode
from center_embed.service.prometheus import Metrics

access_log = logging.getLogger("center_embed.access")
TIMING_HEADERS = {b"x-queue-time": "queue_ms", b"x-inference-time": "inference_ms"}
MAX_LOGGED_PATH = 200
# A scope key service/protocol.py sets on a request whose connection was lost or aborted
# before its answer was out; its value says why ("peer not reading", "connection lost").
ABORTED = "center_embed.aborted"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def loggable_path(path: str) -> str:
    """At most MAX_LOGGED_PATH characters of `path` (and its length when longer), control
    characters as \\xNN: what a log line may say of a path a client chose."""
    head = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path[:MAX_LOGGED_PATH])
    if len(path) > MAX_LOGGED_PATH:
        return f"{head}... ({len(path)} characters)"
    return head


async def _answer_cancelled(send: Any) -> None:
    """A 503 JSON for a request cancelled before its answer began."""
    code = ErrorCode.SHUTTING_DOWN
    message = "the service is shutting down and could not finish this request in time"
    body = json.dumps({"error": {"code": str(code), "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": code.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ObservabilityMiddleware:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": 500}

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"], seen["started"] = message["status"], True
                for name, value in message.get("headers", ()):
                    if name in TIMING_HEADERS:
                        seen[TIMING_HEADERS[name]] = float(value)
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            if "started" in seen:
                raise  # half an answer is out: only closing the connection is left
            await _answer_cancelled(send_and_watch)  # and the request ends here, answered
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            aborted = scope.get(ABORTED)
            if aborted is not None:  # the answer never reached the client
                app_status = seen["status"] if "started" in seen else None
                seen.update(status="aborted", app_status=app_status, aborted=aborted)
            labels = (template, scope["method"], str(seen["status"]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                seen.pop("started", None)
                fields = {
                    "method": scope["method"],
                    "path": loggable_path(scope["path"]),
                    "route": template,
                    **seen,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                }
                access_log.info("request", extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def capture_warnings() -> logging.Filter:
    """A pass-all filter whose making routes Python warnings (Pillow's "Corrupt EXIF data",
    ...) to the `py.warnings` logger: log_config is applied in every worker process, and
    dictConfig has no other hook to run there."""
    logging.captureWarnings(True)
    return logging.Filter()


def log_config(level: str = "info") -> dict[str, Any]:
    """logging.config dict for uvicorn (applied in every worker): JSON lines on stderr,
    Python warnings and python-multipart's messages included (nothing as plain text)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
               "filters": ["warnings"]}  # fmt: skip
    loggers = ("center_embed", "uvicorn", "uvicorn.error", "py.warnings", "python_multipart")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"warnings": {"()": capture_warnings}},
        "handlers": {"stderr": handler},
        "loggers": {
            **{
                name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                for name in loggers
            },  # fmt: skip
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
