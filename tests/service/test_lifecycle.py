"""The service's life: not ready until warmed up (and never after a failed warm-up), the
`serve` command (workers, errors, help), SIGTERM and the graceful shutdown that finishes
the requests in flight."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks._common import descendants
from center_embed.runtime import RuntimeOptions
from center_embed.service.app import create_app
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings
from tests.helpers import (
    API_KEY,
    Gate,
    answer,
    error,
    free_port,
    metric_samples,
    multipart,
    running,
    serve_in_thread,
)


def test_readyz_before_and_after_warm_up(tiny_onnx, images):
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    gate = Gate(served, is_open=False)  # warm-up blocks until the test opens the gate
    with running(tiny_onnx, served, wait_ready=False) as client:
        assert gate.entered.wait(10)
        assert answer(client.get("/healthz")) == (200, {"status": "ok"})
        not_ready = error(503, "not_ready", "model is loading or warming up")
        assert answer(client.get("/readyz")) == not_ready
        assert answer(client.post("/v1/embed", files=multipart(images[0]))) == not_ready
        assert "center_embed_ready 0.0" in client.get("/metrics").text
        gate.opened.set()
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert answer(client.get("/readyz")) == (200, {"status": "ready"})
        assert client.post("/v1/embed", files=multipart(images[0])).status_code == 200
        assert "center_embed_ready 1.0" in client.get("/metrics").text


def test_warm_up_failure_stays_not_ready(tiny_onnx):
    good = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    wrong = ServedModel(good.model, good.centers + 1.0, good.sha256)  # not the graph's centers
    with running(tiny_onnx, wrong, wait_ready=False) as client:
        deadline = time.monotonic() + 10
        while not client.app.state.warmup_error:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = answer(client.get("/readyz"))
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert "centers initializer is not what the graph uses" in body["error"]["message"]


@contextlib.contextmanager
def uvicorn_says(text: str) -> Iterator[threading.Event]:
    """An event set once uvicorn logs a message holding `text` (its INFO messages are
    let through meanwhile: the test server logs warnings only)."""
    said = threading.Event()

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                said.set()

    logger, listener = logging.getLogger("uvicorn.error"), Listener(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(listener)
    try:
        yield said
    finally:
        logger.removeHandler(listener)
        logger.setLevel(level)


def test_graceful_shutdown_finishes_in_flight_requests(tiny_onnx, images):
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    gate = Gate(served)
    app = create_app(Settings(model=tiny_onnx), model=served)
    with serve_in_thread(app) as server, ThreadPoolExecutor(3) as pool:
        gate.opened.clear()
        gate.entered.clear()
        url = f"{server.url}/v1/classify"
        pending = [pool.submit(httpx.post, url, files=multipart(images[0]), timeout=30)]
        assert gate.entered.wait(10)
        pending += [
            pool.submit(httpx.post, url, files=multipart(x), timeout=30) for x in images[1:3]
        ]
        deadline = time.monotonic() + 10
        while app.state.batcher.queued_images < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with uvicorn_says("Waiting for connections to close") as waiting:
            server.server.should_exit = True  # what SIGTERM does
            # uvicorn has stopped listening, asked each connection to finish, and now waits.
            assert waiting.wait(10)
        assert not any(f.done() for f in pending)  # still held, not dropped
        gate.opened.set()
        assert [f.result().status_code for f in pending] == [200, 200, 200]


def decode_workers_under(pid: int) -> list[int]:
    """The decode worker processes among `pid`'s descendants (service/decode_pool.py)."""
    found = []
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if b"_worker_entry" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_serve_workers_and_sigterm(tiny_onnx, images, workers):
    port = free_port()
    command = [sys.executable, "-m", "center_embed.cli", "serve", str(tiny_onnx),
               "--port", str(port), "--workers", str(workers)]  # fmt: skip
    env = {**os.environ, "CENTER_EMBED_API_KEYS": API_KEY}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"

    def logged() -> list[dict]:
        return [json.loads(line) for line in list(lines) if line.startswith("{")]

    try:
        deadline = time.monotonic() + 60
        while sum(line["message"] == "ready" for line in logged()) < workers:  # all ready
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(4):  # new connections: either worker may answer
            response = httpx.post(f"{url}/v1/embed", files=multipart(images[0]), headers=headers)
            assert response.status_code == 200
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
        labels = (("method", "POST"), ("route", "/v1/embed"), ("status", "200"))
        assert samples[("center_embed_requests_total", labels)] == 4  # summed over workers
        # Each worker runs its two decode pools on its share of the cores (and a spare each).
        share = max(1, (os.cpu_count() or 1) // workers)
        assert "CENTER_EMBED_DECODE_THREADS" not in os.environ
        expected = workers * ((share + 1) + (max(1, share // 2) + 1))
        assert len(decode_workers_under(process.pid)) == expected
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    reader.join(10)
    access = [line for line in logged() if line["logger"] == "center_embed.access"]
    assert {"method", "path", "status", "duration_ms", "queue_ms", "inference_ms"} <= set(
        next(line for line in access if line["path"] == "/v1/embed")
    )
    assert sum(line["message"] == "stopped" for line in logged()) == workers
    assert API_KEY not in "".join(lines)


def test_cli_errors_and_help(tmp_path, capsys, monkeypatch):
    from center_embed.cli import main

    monkeypatch.setenv("CENTER_EMBED_MODEL", "")  # serve sets it; restored afterwards

    assert main(["serve", str(tmp_path / "absent.onnx")]) == 1
    assert "error: model not found" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    assert main(["serve", str(tmp_path / "junk.onnx")]) == 1
    assert "is not a readable ONNX model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "MAX_BATCH" in capsys.readouterr().out
