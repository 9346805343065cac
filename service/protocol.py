"""uvicorn's HTTP/1.1 protocols with the connection limits uvicorn lacks.

uvicorn (0.54) bounds idle keep-alive time, but not the size of a request's headers under
httptools (a client sent 1 GB of header lines into one connection), not the time a client
may take to send them (slowloris), nor the number of open connections (`limit_concurrency`
answers 503 only to requests whose headers are complete, so trickling connections are
never refused). This module adds, per connection, for both of uvicorn's parsers:

- header bytes: the bytes received while a request's headers are incomplete are counted;
  past `max_header_bytes` the client gets 431 (JSON) and the connection is closed. (The
  parser may hold one more read, at most 256 KiB, before the count sees it.)
- header time: from the connection's start, and again from the end of each response, the
  next request's headers must be complete within `header_timeout_s`; else 408 (JSON, when
  anything arrived) and the connection is closed.
- connections: a connection beyond `max_connections` open ones (per worker) gets 503
  (JSON) and is closed at once.

The body's own deadline is the app's (service/images.py read_body: 408). The limits come
from CENTER_EMBED_* settings in every worker (`ConnectionLimits.from_env`); tests build a
class with their own limits (`protocol_class`).
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from center_embed.service.error_codes import ErrorCode
from center_embed.service.settings import Settings

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
           503: b"Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_s, settings.max_connections)

    @classmethod
    @functools.cache
    def from_env(cls) -> ConnectionLimits:
        return cls.from_settings(Settings())


def error_bytes(code: ErrorCode, message: str) -> bytes:
    """A whole HTTP/1.1 error answer with a JSON body, closing the connection."""
    body = json.dumps({"error": {"code": str(code), "message": message}}).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (code.status, REASONS[code.status], len(body))
    )
    return head + body


class _Guarded:
    """The limits, on top of uvicorn's HttpToolsProtocol or H11Protocol (see the module)."""

    limits: ClassVar[ConnectionLimits | None] = None  # None: from the environment
    # What the uvicorn class provides:
    transport: asyncio.Transport
    connections: set
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._limits = self.limits or ConnectionLimits.from_env()
        self._timer: asyncio.TimerHandle | None = None
        self._cycle_before = None  # the request (cycle) there was when the wait began
        if len(self.connections) > self._limits.max_connections:
            message = f"more than {self._limits.max_connections} open connections; retry later"
            self._refuse(ErrorCode.TOO_MANY_CONNECTIONS, message)
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing() or self._timer is None:
            return  # closed by the parser (a 400), or a request's body: not ours to count
        if self.cycle is not self._cycle_before:  # a new request's headers are complete
            self._stop_timer()
            return
        self._header_bytes += len(data)
        if self._header_bytes > self._limits.max_header_bytes:
            message = f"the request line and headers pass {self._limits.max_header_bytes} bytes"
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, message)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and not self._in_flight():
            self._await_headers()  # the next request on this connection (unless pipelined)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_headers(self) -> None:
        self._stop_timer()
        self._header_bytes = 0
        self._cycle_before = self.cycle
        self._timer = self.loop.call_later(self._limits.header_timeout_s, self._too_slow)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._in_flight():
            return
        if self._header_bytes == 0:  # idle: close as a keep-alive timeout would
            self.transport.close()
            return
        message = f"the request headers did not arrive within {self._limits.header_timeout_s:g} s"
        self._refuse(ErrorCode.HEADER_TIMEOUT, message)

    def _refuse(self, code: ErrorCode, message: str) -> None:
        self._stop_timer()
        self.transport.write(error_bytes(code, message))
        self.transport.close()


class H11Guarded(_Guarded, H11Protocol):
    """uvicorn's h11 protocol with the limits (h11's own 16 KiB event limit stays too)."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsGuarded(_Guarded, HttpToolsProtocol):
        """uvicorn's httptools protocol with the limits (httptools has none of its own)."""

except ImportError:  # httptools is optional for uvicorn
    HttpToolsGuarded = None  # type: ignore[assignment,misc]


def protocol_class(http: str = "auto", limits: ConnectionLimits | None = None) -> type:
    """The guarded protocol for uvicorn's `http` option ("auto": httptools when installed),
    with `limits` fixed (None: read from the environment in each worker)."""
    base = HttpToolsGuarded if http in ("auto", "httptools") else H11Guarded
    if base is None:
        if http == "httptools":
            raise RuntimeError("httptools is not installed: pip install httptools")
        base = H11Guarded
    if limits is None:
        return base
    return type(base.__name__, (base,), {"limits": limits, "__module__": __name__})


def protocol_path(http: str = "auto") -> str:
    """The import string of `protocol_class(http)`, for uvicorn.run (workers import it)."""
    return f"{__name__}:{protocol_class(http).__name__}"
