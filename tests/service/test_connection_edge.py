"""The connection edge (service/protocol.py) against the real app under uvicorn on
127.0.0.1, in this process (its log records captured, its memory read from /proc/self):
slow readers, pipelined header bytes, and what a refusal leaves in the log and metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from center_embed.runtime import RuntimeOptions
from center_embed.service.app import create_app
from center_embed.service.middleware import JsonFormatter, log_config
from center_embed.service.protocol import ConnectionLimits, protocol_class
from center_embed.service.served_model import ServedModel
from center_embed.service.server import uvicorn_options
from center_embed.service.settings import Settings
from tests.helpers import ROOT, Gate, b64, encode, metric_samples, tiny_images, wait_until

GET_OPENAPI = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass
class Edge:
    url: str
    port: int
    records: list[logging.LogRecord]
    server: uvicorn.Server

    def refusals(self) -> dict[str, float]:
        samples = metric_samples(httpx.get(f"{self.url}/metrics", timeout=5).text)
        name = "center_embed_connection_refusals_total"
        return {dict(labels)["reason"]: v for (n, labels), v in samples.items() if n == name}

    def edge_lines(self) -> list[dict]:
        """The refusals and aborts in the access log, as the JSON lines the service writes."""
        formatter = JsonFormatter()
        return [
            json.loads(formatter.format(r))
            for r in unique(self.records)
            if r.name == "center_embed.access" and r.getMessage() in ("refused", "aborted")
        ]


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of the service, uvicorn and asyncio loggers (and the root), each once;
    the access log enabled at INFO."""
    records: list[logging.LogRecord] = []
    handler = _Keep(records)
    names = ("", "center_embed", "uvicorn", "uvicorn.error", "asyncio")
    access = logging.getLogger("center_embed.access")
    level = access.level
    access.setLevel(logging.INFO)
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        yield records
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
        access.setLevel(level)


def unique(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return list({id(r): r for r in records}.values())


@contextlib.contextmanager
def edge_server(
    model: Path, served: ServedModel | None = None, http: str = "httptools", **settings
) -> Iterator[Edge]:
    """The app with these settings under uvicorn and the guarded protocol, on a free port."""
    settings = Settings(model=model, graceful_shutdown_s=1, **settings)
    app = create_app(settings, model=served)
    protocol = protocol_class(http, ConnectionLimits.from_settings(settings))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False,
                            lifespan="on", **uvicorn_options(settings, http=protocol))  # fmt: skip
    server = uvicorn.Server(config)
    with captured_logs() as records:
        thread = threading.Thread(target=server.run, name="uvicorn-edge", daemon=True)
        thread.start()
        try:
            wait_until(lambda: server.started or not thread.is_alive(), 20, "the start")
            assert thread.is_alive(), "the server did not start"
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 20, "ready")
            yield Edge(url, port, records, server)
        finally:
            server.should_exit = True
            thread.join(20)


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send `data` on a new connection; read until the server closes it (or `wait`)."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        deadline = time.monotonic() + wait
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


def slow_reader(port: int, requests: int) -> socket.socket:
    """A connection with a tiny receive buffer that pipelines `requests` GET /openapi.json
    and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(GET_OPENAPI * requests)
    return sock


def test_slow_readers_lose_their_slots_after_the_write_timeout(tiny_onnx):
    """Defect 3: 260 sockets that pipelined GET /openapi.json and never read held all 256
    slots for 45 s and more (every new request 503); on close, one traceback each (a
    pipelined response writing on the closed transport), and the access log said 200."""
    with edge_server(tiny_onnx, max_connections=4, write_timeout_s=1.0) as edge:

        def stalled() -> int:  # connections whose answers the peer does not read
            return sum(p.flow.write_paused for p in list(edge.server.server_state.connections))

        readers = [slow_reader(edge.port, 400) for _ in range(4)]
        try:
            wait_until(lambda: stalled() == 4, 10, "4 stalled connections")
            # every slot is held: a fresh connection is refused
            assert status_of(exchange(edge.port, b"", 2)) == 503
            # they are aborted once they have read nothing for the write timeout
            started = time.monotonic()
            wait_until(
                lambda: httpx.get(f"{edge.url}/healthz", timeout=5).status_code == 200,
                5,
                "a slot for a fresh client",
            )
            assert time.monotonic() - started < 1.0 + 3
            wait_until(lambda: edge.refusals()["write_timeout"] == 4, 5, "4 write timeouts")
            # a peer that gives up by itself, before the write timeout: no traceback either
            readers.append(slow_reader(edge.port, 400))
            wait_until(lambda: stalled() == 1, 10, "a stalled connection")
            readers.pop().close()
            wait_until(lambda: not edge.server.server_state.connections, 5, "the close seen")
        finally:
            for sock in readers:
                sock.close()
        metrics = edge.refusals()
        records = unique(edge.records)
    assert metrics["write_timeout"] == 4
    assert metrics["too_many_connections"] >= 1
    bad = [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    assert not any("TCPTransport closed" in r.getMessage() for r in records)
    requests = [r.fields for r in records if r.getMessage() == "request"]
    aborted = [f for f in requests if f["status"] == "aborted"]
    assert any(f["aborted"] == "peer not reading" and f["app_status"] == 200 for f in aborted)
    assert any(f["aborted"] == "connection lost" for f in aborted)
    lines = [line for line in edge.edge_lines() if line["reason"] == "write_timeout"]
    assert len(lines) == 4
    assert lines[0]["message"] == "aborted" and "read nothing" in lines[0]["detail"]


def _embed_request() -> bytes:
    body = json.dumps({"images": [b64(encode(tiny_images(1)[0]))]}).encode()
    return (
        b"POST /v1/embed HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    ) + body


FLOODS = {
    "header lines": b"X-Flood: " + b"a" * 990 + b"\r\n",
    "one giant value": b"a" * 1000,
}


@pytest.mark.parametrize("http", ["httptools", "h11"])
@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_pipelined_header_bytes_are_bounded(tiny_onnx, flood, http):
    """Defect 4: while a slow request ran on a connection, 100 MB of header lines for the
    next one were all taken in (RSS +2.5 GB), and one giant header value stalled the loop
    3 s (quadratic concatenation). Now the next request's header bytes count: the server
    stops reading them past max_header_bytes, answers the slow request, then 431."""
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu", 1))
    gate = Gate(served)  # open for the warm-up
    with edge_server(tiny_onnx, served, http=http, max_wait_ms=0, timeout_s=30) as edge:
        gate.opened.clear()
        gate.entered.clear()
        before = rss_mb()
        sock = socket.create_connection(("127.0.0.1", edge.port))
        try:
            sock.sendall(_embed_request())
            assert gate.entered.wait(10), "the slow request never reached the model"
            giant = b"X-Big: " if flood == "one giant value" else b""
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + giant)
            chunk, sent, started = FLOODS[flood] * 64, 0, time.monotonic()
            sock.settimeout(1.0)  # the server stops reading: the kernel's buffers fill
            with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
                while sent < 20 * 1024 * 1024 and time.monotonic() - started < 10:
                    sock.sendall(chunk)
                    sent += len(chunk)
            assert sent < 20 * 1024 * 1024, "the server took in 20 MB of header bytes"
            healthz = time.monotonic()
            assert httpx.get(f"{edge.url}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - healthz < 0.5  # the loop is not stalled
            assert rss_mb() - before < 100
            gate.opened.set()
            answers = b""
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answers += chunk
        finally:
            gate.opened.set()
            sock.close()
        metrics = edge.refusals()
    first, _, rest = answers.partition(b"\r\n")
    assert first == b"HTTP/1.1 200 OK", answers[:300]
    assert b"HTTP/1.1 431 " in rest and b"headers_too_large" in rest, answers[-500:]
    assert metrics["headers_too_large"] >= 1


def test_edge_refusals_are_logged_and_counted(tiny_onnx):
    """Defect 9: 503, 431 and 408 at the connection appeared in neither the access log nor
    the metrics."""
    with edge_server(tiny_onnx, max_connections=3, header_timeout_s=0.5) as edge:
        before = edge.refusals()
        assert status_of(exchange(edge.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 40_000)) == 431
        assert status_of(exchange(edge.port, b"GET / HTTP/1.1\r\nX: a\r\n")) == 408
        held = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(3)]
        try:
            wait_until(lambda: status_of(exchange(edge.port, b"", 2)) == 503, 5, "a 503")
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: httpx.get(f"{edge.url}/healthz").status_code == 200, 5, "room")
        after = edge.refusals()
        lines = edge.edge_lines()
    for reason in ("headers_too_large", "header_timeout", "too_many_connections"):
        assert after[reason] > before[reason], reason
    by_reason = {line["reason"]: line for line in lines}
    assert by_reason["headers_too_large"]["status"] == 431
    assert by_reason["header_timeout"]["status"] == 408
    assert by_reason["too_many_connections"]["status"] == 503
    for line in by_reason.values():
        assert line["logger"] == "center_embed.access" and line["message"] == "refused"
        assert line["client"].startswith("127.0.0.1:") and line["detail"]


def test_warnings_and_multipart_messages_are_json_lines():
    """Defect 9: Pillow's "Corrupt EXIF data" warning and python-multipart's messages went
    to stderr as plain text."""
    script = (
        "import logging.config, warnings\n"
        "from center_embed.service.middleware import log_config\n"
        "logging.config.dictConfig(log_config('info'))\n"
        "warnings.warn('Corrupt EXIF data', UserWarning)\n"
        "logging.getLogger('python_multipart.multipart').warning('Did not find boundary')\n"
    )
    assert log_config("info")["filters"]  # what routes the warnings in every worker
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # each one JSON
    assert [line["logger"] for line in lines] == ["py.warnings", "python_multipart.multipart"]
    assert "Corrupt EXIF data" in lines[0]["message"]
    assert lines[1]["message"] == "Did not find boundary"
