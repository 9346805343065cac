"""Issue 11, case by case, against the real app: a real `center-embed serve` process on
127.0.0.1 (its memory read from /proc) for what needs a real server and real sockets, the
app in-process where a test must hold the model or count what the app read.

The attack payloads come from benchmarks/attacks.py, which the soak benchmark sends too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from center_embed.runtime import RuntimeOptions
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings
from tests import attacks
from tests.helpers import free_port, metric_samples, running, tiny_images, wait_until

# The real server's limits in these tests: short, so that each case takes seconds.
LIMITS = {
    "CENTER_EMBED_HEADER_TIMEOUT_S": "1.5",
    "CENTER_EMBED_BODY_TIMEOUT_S": "1.5",
    "CENTER_EMBED_MAX_CONNECTIONS": "24",
    "CENTER_EMBED_TIMEOUT_S": "3",
    "CENTER_EMBED_DECODE_THREADS": "2",
    "CENTER_EMBED_THREADS": "1",
    "CENTER_EMBED_MAX_REQUEST_PIXELS": str(400 * 1024 * 1024),
}


@dataclass
class Server:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory so far (VmHWM), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024


@contextlib.contextmanager
def serve(model: Path, **env: str) -> Iterator[Server]:
    """`center-embed serve model` on a free port, ready; stopped (SIGTERM, then kill)."""
    port = free_port()
    command = [sys.executable, "-m", "center_embed.cli", "serve", str(model), "--port",
               str(port), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(
        command, env={**os.environ, **LIMITS, **env}, stderr=subprocess.PIPE, text=True
    )
    server = Server(process, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(tiny_onnx: Path) -> Iterator[Server]:
    with serve(tiny_onnx) as running:
        yield running


def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send `data` on a new connection, then read until the server closes it (or `wait`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        return read_until_closed(sock, wait)


def read_until_closed(sock: socket.socket, wait: float) -> bytes:
    chunks, deadline = [], time.monotonic() + wait
    with contextlib.suppress(ConnectionResetError, TimeoutError, socket.timeout):
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    raise AssertionError(f"the server did not close the connection within {wait} s")


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def images_received(server: Server, route: str = "/v1/classify") -> float:
    """The server's count of images whose request body it has read, on `route`."""
    samples = metric_samples(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return samples.get(("center_embed_images_total", (("route", route),)), 0.0)


def post_files(url: str, *images: bytes, path: str = "/v1/classify", **kw) -> httpx.Response:
    content_type, body = attacks.multipart(*images)
    return httpx.post(
        url + path, content=body, headers={"content-type": content_type}, timeout=60, **kw
    )


# --------------------------------------------------------------------------- images (1, 7-10)


def test_needle_png_is_answered_with_memory_bounded(server, reference):
    """Item 1: a 1x1,000,000 PNG (a few KB) once took 5.4 GB and 13 s."""
    needle = attacks.needle_png(1_000_000, 1)
    before = server.peak_rss_mb()
    started = time.monotonic()
    response = post_files(server.url, needle)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 5
    assert server.peak_rss_mb() - before < 100  # MB
    want = reference.run(reference.decode(needle)[None])
    assert response.json()["results"][0]["label"] == int(want["labels"][0])


def test_deep_png_classifies_like_its_8bit_version(server):
    """Item 8: a 16-bit PNG once became all white (a cat answered as an airplane)."""
    for pixels in tiny_images(3, seed=5):
        grey = np.asarray(Image.fromarray(pixels).convert("L"))
        eight = post_files(server.url, attacks.encode(Image.fromarray(grey))).json()["results"][0]
        deep = post_files(server.url, attacks.deep_png(grey)).json()["results"][0]
        assert deep["label"] == eight["label"]
        for name, distance in eight["distances"].items():
            assert deep["distances"][name] == pytest.approx(distance, rel=0.05, abs=1e-3)


def test_refused_formats_are_415_fast_and_cost_no_memory(server):
    """Items 7 and 9: an ICO holding a 12000² PNG once cost +500-700 MB before a 413; EPS
    reached Ghostscript. Both are refused from their header bytes."""
    before = server.peak_rss_mb()
    for payload, name in ((attacks.ico_with_png(12_000), "ICO"), (attacks.EPS, "EPS")):
        started = time.monotonic()
        response = post_files(server.url, payload)
        assert time.monotonic() - started < 2
        assert response.status_code == 415
        error = response.json()["error"]
        assert error["code"] == "unsupported_image_format"
        assert f"{name} images are not accepted" in error["message"]
    assert server.peak_rss_mb() - before < 30  # MB


def test_allowlist_is_a_setting(tiny_onnx):
    png = attacks.encode(Image.fromarray(tiny_images(1)[0]))
    with running(tiny_onnx, image_formats="JPEG,WEBP") as client:
        content_type, body = attacks.multipart(png)
        response = client.post("/v1/embed", content=body, headers={"content-type": content_type})
        assert response.status_code == 415
        assert "allowed: JPEG, WEBP" in response.json()["error"]["message"]
    with pytest.raises(ValueError, match="unknown image format"):
        Settings(image_formats="PNG,NOPE")


def test_exif_orientation_embeds_like_the_rotated_image(server):
    """Item 10: orientation 6 was ignored (5.1 away from the rotated image)."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    tagged, upright = attacks.exif_rotated(pixels)
    got = post_files(server.url, tagged, path="/v1/embed").json()["embeddings"]
    want = post_files(server.url, upright, path="/v1/embed").json()["embeddings"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 500s (3, 5)


def test_vectors_whose_distances_overflow_are_422(server, reference):
    """Item 3: 2e19 in a vector was a 500 (non-finite JSON) and reset the connection."""
    dim = reference.info.embedding_dim
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for value in (2e19, 1e30, -2e19):
            response = client.post(
                "/v1/distances",
                content=attacks.huge_vectors(dim, value),
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "out_of_range"
            assert "would overflow float32" in response.json()["error"]["message"]
        fine = client.post("/v1/distances", json={"embeddings": [[1e3] * dim]})  # same socket
        assert fine.status_code == 200
        assert all(np.isfinite(list(fine.json()["results"][0]["distances"].values())))


def test_non_finite_model_outputs_are_a_422_naming_the_input(tiny_onnx):
    """A model that answers NaN must not make the JSON encoder raise (a 500)."""
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu", 1))
    inner = served.run
    poisoned = {"on": False}

    def run(images):
        out = inner(images)
        if poisoned["on"]:
            out = {k: v.copy() for k, v in out.items()}
            out["embeddings"][-1, 0] = np.nan
        return out

    served.run = run
    images = [attacks.encode(Image.fromarray(p)) for p in tiny_images(2)]
    with running(tiny_onnx, served) as client:
        poisoned["on"] = True
        content_type, body = attacks.multipart(*images)
        response = client.post("/v1/embed", content=body, headers={"content-type": content_type})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "non_finite_output"
        assert response.json()["error"]["message"].startswith(
            'the model\'s outputs for files[1] ("i1") are not finite'
        )


@pytest.mark.parametrize(
    ("poison", "named"),
    [(np.nan, "b"), (np.inf, "b"), (-np.inf, "b"), (None, None), ("overflow", None)],
)
def test_require_finite_names_the_first_bad_row_and_passes_large_finite_values(poison, named):
    """The check sums every value first (NaN and infinity carry into a sum); a sum that
    overflows on finite values looks at the rows before it answers."""
    from center_embed.service.errors import ApiError
    from center_embed.service.pipeline import require_finite

    outputs = {"embeddings": np.ones((3, 4), np.float32), "labels": np.arange(3)}
    outputs["distances"] = np.ones((3, 2), np.float64)
    if poison == "overflow":
        outputs["distances"][:] = 1e308  # finite, but they sum past float64's range
    elif poison is not None:
        outputs["distances"][1, 1] = poison
        outputs["embeddings"][2, 0] = -poison
    if named is None:
        require_finite(outputs, ["a", "b", "c"])
        return
    with pytest.raises(ApiError) as raised:
        require_finite(outputs, ["a", "b", "c"])
    assert raised.value.code == "non_finite_output"
    assert str(raised.value).startswith("the model's outputs for b are not finite")
    assert "2 of 3 inputs affected" in str(raised.value)


def test_sigterm_answers_every_admitted_request_200_or_503(tiny_onnx):
    """Item 5: SIGTERM with slow requests in flight once cut two of them with a 500."""
    blank = attacks.big_blank(4096)
    slow = [blank] * 5  # ~2 s of decoding each, on 2 threads for 6 requests
    with serve(tiny_onnx, CENTER_EMBED_GRACEFUL_SHUTDOWN_S="1", CENTER_EMBED_TIMEOUT_S="30") as s:
        ordinary = attacks.encode(Image.fromarray(tiny_images(1)[0]))

        def one(images: list[bytes]) -> int | str:
            try:
                return post_files(s.url, *images).status_code
            except httpx.HTTPError as e:
                return type(e).__name__

        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(one, slow) for _ in range(6)]
            answers += [pool.submit(one, [ordinary]) for _ in range(2)]
            # Every request is in (its body read, its images counted), most still decoding.
            wait_until(lambda: images_received(s) == 6 * len(slow) + 2, 30, "all requests in")
            s.process.send_signal(signal.SIGTERM)
            statuses = [a.result(timeout=60) for a in answers]
        assert s.process.wait(30) == 0
        stderr = s.process.stderr.read()
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, statuses  # some could not finish within the 1 s grace
    assert "Exception in ASGI application" not in stderr


# --------------------------------------------------------------------------- the loop (4, 6)


def test_slow_decoding_gets_504_and_does_not_starve_others(server):
    """Item 4: two requests of slow images held both decode threads 20 s, past the 10 s
    timeout, while an ordinary request waited 20 s."""
    attack = [attacks.big_blank(4096)] * 16  # ~6 s of decoding each, timeout 3 s
    ordinary = attacks.encode(Image.fromarray(tiny_images(1)[0]))
    with ThreadPoolExecutor(2) as pool:
        before = images_received(server)
        started = time.monotonic()
        slow = [pool.submit(post_files, server.url, *attack) for _ in range(2)]
        # Both attacks are in (their bodies read, their images counted), so decoding.
        wait_until(lambda: images_received(server) == before + 2 * len(attack), 30, "attacks in")
        asked = time.monotonic()
        response = post_files(server.url, ordinary)
        waited = time.monotonic() - asked
        slow_answers = [f.result(timeout=60) for f in slow]
        attack_seconds = time.monotonic() - started
    assert response.status_code == 200
    assert waited < 2.5, waited  # at most a few image decodes of the attacks ahead of it
    for answer in slow_answers:
        assert answer.status_code == 504
        assert "decoding" in answer.json()["error"]["message"]
    assert attack_seconds < 3 + 2.5  # the timeout, plus the image being decoded at it


def test_request_pixels_are_bounded_before_decoding(tiny_onnx):
    blank = attacks.big_blank(4096)  # 16.8 M pixels each
    with running(tiny_onnx, max_request_pixels=40_000_000) as client:
        content_type, body = attacks.multipart(blank, blank, blank)
        started = time.monotonic()
        response = client.post("/v1/embed", content=body, headers={"content-type": content_type})
        assert time.monotonic() - started < 0.5  # three headers read, nothing decoded
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_many_pixels"


def test_many_multipart_parts_are_refused_after_reading_few(tiny_onnx):
    """Item 6: 600k parts once took 3.8 s of parsing on the event loop before any answer."""
    content_type, body = attacks.many_parts(600_000)
    chunk = 65536
    with running(tiny_onnx) as client:
        app = client.app
        read = {"chunks": 0}

        async def receive():
            start = read["chunks"] * chunk
            read["chunks"] += 1
            more = start + chunk < len(body)
            return {"type": "http.request", "body": body[start : start + chunk], "more_body": more}

        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/embed", "raw_path": b"/v1/embed",
                 "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "app": app,
                 "headers": [(b"content-type", content_type.encode())]}  # fmt: skip
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_many_parts"
    assert read["chunks"] <= 2, read  # of the 552 chunks of the body


def test_healthz_stays_fast_while_big_json_is_posted(server, reference):
    """Item 6: a 33 MB vector stalled /healthz 1.46 s; now refused from its Content-Length,
    and a big body within the limit is parsed off the event loop."""
    huge = attacks.long_vector(30)
    dim = reference.info.embedding_dim
    allowed = json.dumps({"embeddings": [[0.5] * dim] * 1024}).encode()  # parsed, 200
    stop = threading.Event()

    def post_big() -> list[int | str]:
        answers = []
        for i in range(6):
            payload = huge if i % 2 == 0 else allowed
            json_type = {"Content-Type": "application/json"}
            data = attacks.request("POST", "/v1/distances", json_type, payload)
            try:
                answers.append(status_and_json(raw_exchange(server.port, data, 30))[0])
            except (BrokenPipeError, ConnectionResetError):
                answers.append("closed while sending")  # refused before it was all sent
        stop.set()
        return answers

    with ThreadPoolExecutor(1) as pool:
        posted = pool.submit(post_big)
        latencies = []
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set() and len(latencies) < 2000:
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)
        answers = posted.result(timeout=120)
    assert answers[1::2] == [200, 200, 200]
    assert all(a in (413, "closed while sending") for a in answers[0::2]), answers
    assert max(latencies) < 0.5, max(latencies)


# --------------------------------------------------------------------------- connections (2, 11)


def test_oversized_headers_get_431_and_are_closed(server):
    """Item 2: 1 GB of header lines were all taken in (RSS +1.1 GB)."""
    status, body = status_and_json(raw_exchange(server.port, attacks.header_flood(20)))  # 20 KB
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    before = server.peak_rss_mb()
    flood_line = b"X-Flood: " + b"a" * 990 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 256 * 1024 * 1024:  # the server must stop this long before
                sock.sendall(flood_line * 64)
                sent += len(flood_line) * 64
    assert sent < 8 * 1024 * 1024, sent
    assert server.peak_rss_mb() - before < 20  # MB


def test_trickling_connections_are_closed_after_the_header_timeout(server):
    """Item 11: 50 trickling connections were held for 30 s."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    started = time.monotonic()
    closed_at: list[float] = []
    try:
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        while len(closed_at) < len(socks) and time.monotonic() - started < 6:
            for sock in socks:
                if sock.fileno() < 0:
                    continue
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"X-a: b\r\n")  # one header line every 0.2 s, never the end
                    sock.settimeout(0.01)
                    with contextlib.suppress(TimeoutError, socket.timeout):
                        data = sock.recv(65536)
                        if data:
                            assert b" 408 " in data.split(b"\r\n")[0]
                            assert b"header_timeout" in data
                        closed_at.append(time.monotonic() - started)
                        sock.close()
                        continue
                    continue
                closed_at.append(time.monotonic() - started)  # reset: closed too
                sock.close()
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed_at) == len(socks)
    assert max(closed_at) < 1.5 + 1.5  # the header timeout, and slack


def test_a_body_shorter_than_its_content_length_gets_408(server):
    """Item 11: such a request waited forever."""
    started = time.monotonic()
    response = raw_exchange(server.port, attacks.short_body(), wait=10)
    assert time.monotonic() - started < 1.5 + 1.5
    status, body = status_and_json(response)
    assert status == 408 and body["error"]["code"] == "body_timeout"


def test_connections_beyond_the_limit_get_503(server):
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(24)]
    try:
        # No wait needed: the kernel queues the connections in order and the server's loop
        # accepts them in that order, so the 24 are counted before the 25th.
        status, body = status_and_json(raw_exchange(server.port, b"", wait=5))
        assert status == 503 and body["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    # Room again once the server has seen the 24 closes (a refusal answers at once).
    wait_until(lambda: httpx.get(f"{server.url}/healthz").status_code == 200, 10, "room")
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # room again


# --------------------------------------------------------------------------- logs (12)


def test_access_log_cuts_long_paths_and_escapes_control_characters(tiny_onnx, caplog):
    with running(tiny_onnx) as client, caplog.at_level(logging.INFO, "center_embed.access"):
        assert client.get(attacks.long_path(65_536)).status_code == 404
    lines = [r for r in caplog.records if r.name == "center_embed.access"]
    path = lines[-1].fields["path"]
    assert len(path) < 250 and path.endswith("... (65532 characters)"), path
    assert "\n" not in path and "\x1b" not in path and path.startswith("/\\x0a\\x1b")
