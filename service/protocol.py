"""uvicorn's HTTP/1.1 protocols with the connection limits uvicorn lacks.

uvicorn bounds idle keep-alive time, but not the size of a request's headers under
httptools (a client sent 1 GB of header lines into one connection), not the time a client
may take to send them (slowloris), not the time a peer may leave a response unread, nor
the number of open connections (`limit_concurrency` answers 503 only to requests whose
headers are complete, so trickling connections are never refused). This module adds, per
connection, for both of uvicorn's parsers:

- header bytes: the bytes of a request whose headers are incomplete are counted, pipelined
  ones too (sent while an earlier request is still being answered); past `max_header_bytes`
  the client gets 431 (JSON), after the answers in flight when there are some, and the
  connection is closed. Bytes are handed to the parser in pieces that stop one byte past
  the limit, so the parser never holds more than the limit of a request's headers (and
  never concatenates a giant header value); the bytes that follow the end of a request in
  the same piece are not counted, so a request's headers are refused by 2 x the limit.
- header time: from the connection's start, and again from the end of each response, the
  next request's headers must be complete within `header_timeout_s`; else 408 (JSON, when
  anything arrived) and the connection is closed.
- write time: a peer that reads nothing of a response for `write_timeout_s` (the
  transport's buffer stays above its high-water mark) has its connection aborted, which
  frees the slot; the request is logged as aborted, never as its status.
- connections: a connection beyond `max_connections` open ones (per worker) gets 503
  (JSON) and is closed at once.

Each of these is one JSON line in the access log ("refused" or "aborted", with a
`reason`) and one count of `center_embed_connection_refusals_total{reason}`.

The body's own deadline is the app's (service/images.py read_body: 408). The limits come
from CENTER_EMBED_* settings in every worker (`ConnectionLimits.from_env`); tests build a
class with their own limits (`protocol_class`).

These classes use uvicorn's protocol internals (`cycle`, `pipeline`, `flow`,
`_start_asgi_task`, the parser callbacks), so pyproject.toml pins uvicorn to the minor
versions tests/service/test_connection_edge.py and test_hardening.py were run on (0.55).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from center_embed.service.error_codes import ErrorCode
from center_embed.service.middleware import ABORTED, access_log
from center_embed.service.prometheus import CONNECTION_REFUSALS, WRITE_TIMEOUT
from center_embed.service.settings import Settings

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
           503: b"Service Unavailable"}  # fmt: skip
NOT_READING = "peer not reading"  # what the access log says of the request it cut


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int
    write_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_s,
                   settings.max_connections, settings.write_timeout_s)  # fmt: skip

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


def edge_event(reason: str, status: int | None, message: str, client: Any) -> None:
    """Count and log (one access-log line) a connection refused or aborted at the edge."""
    CONNECTION_REFUSALS.labels(reason).inc()
    if access_log.isEnabledFor(logging.INFO):
        fields = {
            "status": status if status is not None else "aborted",
            "reason": reason,
            "detail": message,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        access_log.info("refused" if status else "aborted", extra={"fields": fields})


class _Guarded:
    """The limits, on top of uvicorn's HttpToolsProtocol or H11Protocol (see the module)."""

    limits: ClassVar[ConnectionLimits | None] = None  # None: from the environment
    # What the uvicorn class provides:
    transport: asyncio.Transport
    connections: set
    cycle: Any
    flow: Any
    client: Any
    loop: asyncio.AbstractEventLoop

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._limits = self.limits or ConnectionLimits.from_env()
        self._timer: asyncio.TimerHandle | None = None  # the header deadline
        self._write_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # of the request whose headers are incomplete
        self._cycle_before = None  # the request (cycle) there was when the header wait began
        self._refusal: tuple[ErrorCode, str] | None = None  # a 431 after the answers in flight

    # What each parser tells (the subclasses below).
    def _awaiting_headers(self) -> bool:
        """Whether the next byte belongs to the headers of a request not yet started."""
        raise NotImplementedError

    def _mark(self) -> object:
        """A value that changes whenever a request's headers or body end."""
        raise NotImplementedError

    def _cycles(self) -> list:
        """The requests of this connection not yet forgotten: the one being answered first."""
        raise NotImplementedError

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self._limits.max_connections:
            message = f"more than {self._limits.max_connections} open connections; retry later"
            self._refuse(ErrorCode.TOO_MANY_CONNECTIONS, message)
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # a 431 waits for the answers in flight: read no more
            self.flow.pause_reading()
            return
        limit, start = self._limits.max_header_bytes, 0
        while start < len(data):
            awaiting, mark = self._awaiting_headers(), self._mark()
            end = len(data)
            if awaiting:  # at most one byte past the limit: the parser never holds more
                end = min(end, start + limit - self._header_bytes + 1)
            piece = data if start == 0 and end == len(data) else data[start:end]
            start = end
            super().data_received(piece)  # type: ignore[misc]
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # closed by the parser (a 400), or upgraded
            if self._mark() != mark:  # a request's headers or body ended within this piece
                self._header_bytes = 0  # (what follows that end in the piece is not counted)
            elif awaiting:  # the whole piece is the headers of a request not yet started
                self._header_bytes += len(piece)
                if self._header_bytes > limit:
                    self._headers_too_large()
                    return
        if self._timer is not None and self.cycle is not self._cycle_before:
            self._stop_timer()  # a new request's headers are complete

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.transport.is_closing() or self._in_flight():
            return  # or a pipelined request was started
        if self._refusal is not None:
            self._refuse(*self._refusal)
            return
        self._await_headers()  # the next request on this connection

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self._limits.write_timeout_s, self._not_reading
            )

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        # uvicorn marks only the last request parsed as disconnected: a pipelined one being
        # answered before it would write on the closed transport (a traceback) and be logged
        # as its status. Every unfinished request learns the connection is gone.
        for cycle in self._cycles():
            if not cycle.response_complete:
                cycle.scope.setdefault(ABORTED, "connection lost")
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)  # type: ignore[misc]

    # The limits
    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_headers(self) -> None:
        self._stop_timer()
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

    def _headers_too_large(self) -> None:
        message = f"the request line and headers pass {self._limits.max_header_bytes} bytes"
        if self._in_flight():  # answered once the responses before it are out
            self._refusal = (ErrorCode.HEADERS_TOO_LARGE, message)
            self.flow.pause_reading()
        else:
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, message)

    def _not_reading(self) -> None:
        """The peer read nothing for write_timeout_s: abort (close() would wait for the
        buffer to drain, holding the slot), and log the request cut as aborted."""
        self._write_timer = None
        for cycle in self._cycles():
            if not cycle.response_complete:
                cycle.scope.setdefault(ABORTED, NOT_READING)
        seconds = self._limits.write_timeout_s
        message = f"the peer read nothing of the response for {seconds:g} s; connection aborted"
        edge_event(WRITE_TIMEOUT, None, message, self.client)
        self.transport.abort()

    def _refuse(self, code: ErrorCode, message: str) -> None:
        self._stop_timer()
        edge_event(str(code), code.status, message, self.client)
        self.transport.write(error_bytes(code, message))
        self.transport.close()


class H11Guarded(_Guarded, H11Protocol):
    """uvicorn's h11 protocol with the limits (h11's own event-size limit stays too). h11
    answers one request at a time: it pauses on a pipelined one, whose bytes it buffers."""

    conn: h11.Connection

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is not h11.SEND_BODY

    def _mark(self) -> object:
        return (id(self.cycle), self.conn.their_state)

    def _cycles(self) -> list:
        return [self.cycle] if self.cycle is not None else []


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsGuarded(_Guarded, HttpToolsProtocol):
        """uvicorn's httptools protocol with the limits (httptools has none of its own).
        httptools parses pipelined requests at once: uvicorn queues them in `pipeline`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_headers = True  # the parser is in (or before) a request's headers
            self._ends = 0  # of headers and of messages: the parse mark
            self._running: Any = None  # the request being answered

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._ends += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_headers = True
            self._ends += 1

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def _awaiting_headers(self) -> bool:
            return self._in_headers

        def _mark(self) -> object:
            return self._ends

        def _cycles(self) -> list:
            queued = [cycle for cycle, _ in reversed(self.pipeline)]
            found = [c for c in (self._running, *queued, self.cycle) if c is not None]
            return list(dict.fromkeys(found))  # in order, each once

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
