"""Decoding in worker processes that can be killed (service/decode_pool.py), against the real
app under uvicorn: the repeated-scan JPEG refused fast, a decode past its deadline answered
504 (and its worker replaced) while other requests go on, a stuck decode never holding the
shutdown past its grace, and each allowed format's worst case decoded within the stated
memory bound."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from center_embed.imageio import (
    MAX_JPEG_SCANS,
    PEAK_BYTES_PER_PIXEL,
    SAFE_FORMATS,
    ImageTooLargeError,
)
from center_embed.service import decode_pool
from center_embed.service.app import create_app
from center_embed.service.decode_pool import (
    LARGE_IMAGE_NICENESS,
    DecodeExecutor,
    DecodePool,
    DecodeTimeout,
    address_space_for,
)
from center_embed.service.settings import Settings
from tests.attacks import EPS
from tests.helpers import Live, encode, metric_samples, multipart, wait_until

SIDE = 4096


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def big_blank_webp(side: int = SIDE) -> bytes:
    """702 bytes, 0.3-0.5 s to decode at 4096² (benchmarks/attacks.py: big_blank)."""
    return save(Image.new("RGB", (side, side)), "WEBP", lossless=True)


def repeated_scan_jpeg(side: int = SIDE, scans: int = 10_000) -> bytes:
    """The attack: a progressive JPEG whose last scan is repeated `scans` times in all."""
    data = save(Image.new("RGB", (side, side)), "JPEG", progressive=True)
    sos = [m.start() for m in re.finditer(rb"\xff\xda", data)]
    last = data[sos[-1] : data.rindex(b"\xff\xd9")]
    return data[: sos[-1]] + last * (scans - len(sos) + 1) + b"\xff\xd9"


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[Live]:
    """The app under uvicorn with the service's own options (the graceful-shutdown time
    included), on a free port, ready; stopped on exit."""
    import uvicorn

    from center_embed.service.server import uvicorn_options

    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(settings)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-decode-pool", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 30, "the server started")
    assert thread.is_alive()
    port = server.servers[0].sockets[0].getsockname()[1]
    live = Live(f"http://127.0.0.1:{port}", app, server)
    wait_until(lambda: httpx.get(f"{live.url}/readyz").status_code == 200, 30, "ready")
    live.thread = thread
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(30)


def post(url: str, *files: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/embed", files=multipart(*files), timeout=timeout)


def one_pixel_png() -> bytes:
    return encode(np.zeros((1, 1, 3), np.uint8))


@pytest.fixture(scope="module")
def server(tiny_onnx) -> Iterator[Live]:
    settings = Settings(model=tiny_onnx, decode_threads=2, decode_timeout_s=0.05, timeout_s=10)
    with serve(settings) as live:
        yield live


def test_the_repeated_scan_jpeg_is_refused_fast(server):
    attack = repeated_scan_jpeg()
    assert len(attack) < 2_000_000
    started = time.monotonic()
    response = post(server.url, attack)
    assert time.monotonic() - started < 1.0
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_image"
    assert f"more than {MAX_JPEG_SCANS} scans" in error["message"]
    assert error["message"].startswith('files[0] ("image0.png")')


def test_a_decode_past_its_deadline_is_504_and_others_go_on(server):
    pool: DecodePool = server.app.state.large_decode_pool  # a WebP: the sniff does not read it
    replaced, pids = pool.replaced, set(pool.pids)
    counted = replaced_metric(server.url)
    slow, ordinary = big_blank_webp(), one_pixel_png()
    with ThreadPoolExecutor(1) as threads:
        attack = threads.submit(post, server.url, ordinary, slow, ordinary)
        wait_until(lambda: pool.busy > 0 or attack.done(), 10, "the slow image decoding")
        assert post(server.url, ordinary).status_code == 200  # meanwhile, in the small pool
        answer = attack.result(30)
    assert answer.status_code == 504
    message = answer.json()["error"]["message"]
    assert message == 'files[1] ("image1.png"): decoding took longer than 0.05 s; stopped'
    # Its worker was killed, and a new one took its place; the pool serves as before.
    assert pool.replaced == replaced + 1
    assert replaced_metric(server.url) == {"small": counted["small"], "large": counted["large"] + 1}
    wait_until(lambda: len(pool.pids) == pool.size + 1, 30, "the replacement started")
    assert set(pool.pids) != pids
    with ThreadPoolExecutor(4) as threads:
        answers = list(threads.map(lambda _: post(server.url, ordinary), range(8)))
    assert [a.status_code for a in answers] == [200] * 8


def decode_metrics(url: str, name: str) -> dict[str, float]:
    """A decode pool metric by pool, from the service's /metrics."""
    samples = metric_samples(httpx.get(f"{url}/metrics").text)
    return {labels[0][1]: v for (n, labels), v in samples.items() if n == name}


def replaced_metric(url: str) -> dict[str, float]:
    return decode_metrics(url, "center_embed_decode_workers_replaced_total")


def stop_workers(pool: DecodePool) -> list[int]:
    """SIGSTOP every worker of `pool`, so a call sent to one waits (a stuck decoder, from
    outside: the pool holds no test hook); the stopped pids."""
    pids = pool.pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def test_a_decode_worker_that_dies_is_a_bad_image_and_is_replaced(server):
    pool: DecodePool = server.app.state.decode_pool
    replaced = pool.replaced
    stopped = stop_workers(pool)  # a call now waits in its worker: one is killed from outside
    try:
        with ThreadPoolExecutor(1) as threads:
            stuck = threads.submit(post, server.url, one_pixel_png())
            wait_until(lambda: pool.busy > 0, 10, "a call in a worker")
            with pool._lock:  # the busy worker: the one not idle
                (busy,) = [w for w in pool._all if w not in pool._idle]
            busy.process.kill()
            answer = stuck.result(30)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert answer.status_code == 400
    assert "the decode worker died (killed by SIGKILL)" in answer.json()["error"]["message"]
    assert pool.replaced == replaced + 1
    assert post(server.url, one_pixel_png()).status_code == 200


def test_large_images_never_hold_the_workers_small_ones_wait_for(tiny_onnx):
    """Small images (their header says so) and large ones go to pools of their own: with
    every large-image worker stuck, small images are still answered at once; the large
    pool's workers run at a lower CPU priority."""
    settings = Settings(model=tiny_onnx, decode_threads=1, decode_timeout_s=60, timeout_s=60)
    large = encode(np.zeros((1100, 1000, 3), np.uint8))  # 1.1 M pixels: over 1024², a PNG
    with serve(settings) as live, ThreadPoolExecutor(1) as threads:
        small_pool = live.app.state.decode_pool
        large_pool: DecodePool = live.app.state.large_decode_pool
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert {os.getpriority(os.PRIO_PROCESS, pid) - ours for pid in large_pool.pids} == {
            LARGE_IMAGE_NICENESS
        }
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in small_pool.pids} == {ours}
        stopped = stop_workers(large_pool)
        try:
            stuck = threads.submit(post, live.url, large)
            wait_until(lambda: large_pool.busy == 1, 10, "the large image in its worker")
            for _ in range(4):  # one small pool worker, one large: the small is free
                assert post(live.url, one_pixel_png(), timeout=10).status_code == 200
            assert not stuck.done()
            busy = decode_metrics(live.url, "center_embed_decode_busy")
            assert busy == {"small": 0, "large": 1}
            # A refusal is answered at once too: a format outside the allowlist, no image.
            assert post(live.url, EPS, timeout=10).status_code == 415
            assert post(live.url, b"not an image", timeout=10).status_code == 400
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert stuck.result(30).status_code == 200  # once its worker runs again


def test_an_image_goes_to_the_pool_its_header_says():
    large = DecodeExecutor(None, 1, 1.0, 1.0)
    small = DecodeExecutor(None, 1, 1.0, 1.0, large=large)
    webp = save(Image.new("RGB", (8, 8)), "WEBP")
    try:
        assert small.for_image(encode(np.zeros((32, 32, 3), np.uint8)), SAFE_FORMATS) is small
        assert small.for_image(save(Image.new("RGB", (1024, 1024)), "JPEG"), SAFE_FORMATS) is small
        # A progressive JPEG may take 100 passes: counted 16 times its pixels.
        progressive = {"progressive": True}
        square = Image.new("RGB", (256, 256))
        assert small.for_image(save(square, "JPEG", **progressive), SAFE_FORMATS) is small
        assert small.for_image(save(square.resize((257, 256)), "JPEG", **progressive),
                               SAFE_FORMATS) is large  # fmt: skip
        assert small.for_image(encode(np.zeros((1025, 1024, 3), np.uint8)), SAFE_FORMATS) is large
        assert small.for_image(webp, SAFE_FORMATS) is large  # its size is not sniffed
        assert small.for_image(webp, ["PNG", "JPEG"]) is small  # refused at once: 415
        assert small.for_image(EPS, SAFE_FORMATS) is small
        assert small.for_image(b"not an image", SAFE_FORMATS) is small
        for short in (b"", b"ab", b"abc"):  # DIB's header check needs 4 bytes
            assert small.for_image(short, SAFE_FORMATS) is small
            assert small.for_image(short, None) is small
    finally:
        small.shutdown()


def test_a_pool_caps_the_pixels_it_decodes_whatever_it_is_asked():
    """The small images' pool refuses an image over its own size, even when the caller's
    limit is higher (a header that lied to the sniff): its memory stays small."""
    pool = DecodePool(1, 32 * 32)
    try:
        image = encode(np.zeros((40, 40, 3), np.uint8))
        with pytest.raises(ImageTooLargeError, match="more than the limit of 1024"):
            pool.decode(image, 8, SIDE * SIDE, None, time.monotonic() + 30)
        small = encode(np.zeros((32, 32, 3), np.uint8))
        assert pool.decode(small, 8, None, None, time.monotonic() + 30).shape == (8, 8, 3)
    finally:
        pool.close()


def test_a_worker_that_never_starts_is_a_timeout_not_a_bad_image(monkeypatch):
    """A worker that does not say it is ready within its start-up time (stopped here before
    its imports end) is replaced, and the call raises DecodeTimeout (504), not WorkerDied
    (400 bad_image): the image was never looked at."""
    monkeypatch.setattr(decode_pool, "START_TIMEOUT_S", 0.5)
    pool = DecodePool(1, 32 * 32)
    try:
        stopped = stop_workers(pool)  # ~0.2 s of imports each: stopped before b"ready"
        with pytest.raises(DecodeTimeout, match="no decode worker started in time"):
            pool.decode(one_pixel_png(), 8, None, None, time.monotonic() + 10)
        assert pool.replaced == 1
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        pool.close()


def test_shutdown_with_a_stuck_decode_ends_within_its_grace(tiny_onnx):
    grace = 0.5
    settings = Settings(
        model=tiny_onnx,
        decode_threads=1,
        timeout_s=120,
        decode_timeout_s=120,
        graceful_shutdown_s=grace,
    )
    with serve(settings) as live, ThreadPoolExecutor(1) as threads:
        pool: DecodePool = live.app.state.decode_pool
        pids = pool.pids + live.app.state.large_decode_pool.pids
        stop_workers(pool)  # a decode that holds its worker until it is killed
        stuck = threads.submit(post, live.url, one_pixel_png())
        wait_until(lambda: pool.busy > 0, 10, "the decode stuck in its worker")
        started = time.monotonic()
        live.server.should_exit = True  # what SIGTERM does
        live.thread.join(30)
        stopped = time.monotonic() - started
        assert not live.thread.is_alive()
        with contextlib.suppress(httpx.HTTPError):
            assert stuck.result(10).status_code == 503
    assert stopped < grace + 2.0, stopped
    for pid in pids:  # every worker is gone (killed and reaped)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --------------------------------------------------------------------------- memory


def worst_cases(side: int = SIDE) -> dict[str, bytes]:
    """The costliest image of each allowed format at side² pixels (memory depends on the
    pixels and their kind, not on the content: blank images encode fast)."""
    rgb = Image.new("RGB", (side, side), (200, 100, 50))
    rgba = rgb.convert("RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # turned: a copy of the decoded image
    grey32 = np.zeros((side, side), np.float32)
    deflate = {"compression": "tiff_adobe_deflate"}
    return {
        "JPEG progressive 4:4:4": save(rgb, "JPEG", progressive=True, subsampling=0),
        "JPEG CMYK progressive": save(rgb.convert("CMYK"), "JPEG", progressive=True),
        "JPEG turned by EXIF": save(rgb, "JPEG", progressive=True, subsampling=0, exif=exif),
        "PNG 16-bit grey": save(Image.fromarray(grey32.astype(np.uint16)), "PNG"),
        "PNG RGBA turned by EXIF": save(rgba, "PNG", exif=exif),
        "WEBP lossless RGBA": save(rgba, "WEBP", lossless=True),
        "GIF": save(rgb.convert("P"), "GIF"),
        "BMP 32-bit": save(Image.new("RGBA", (side, side // 2)), "BMP"),  # 32 MB: the body limit
        "TIFF float32": save(Image.fromarray(grey32, "F"), "TIFF", **deflate),
        "TIFF float32 turned": save(Image.fromarray(grey32, "F"), "TIFF", exif=exif, **deflate),
        "TIFF int32": save(Image.fromarray(grey32.astype(np.int32), "I"), "TIFF", **deflate),
        "TIFF CMYK": save(rgb.convert("CMYK"), "TIFF", **deflate),
    }


def test_each_formats_worst_case_decodes_within_the_stated_bound():
    """imageio.py's "Memory": at most PEAK_BYTES_PER_PIXEL bytes per pixel beyond the encoded
    bytes, measured as the peak RSS of a fresh decode worker over its RSS with the bytes in;
    the worker's RLIMIT_AS is above that bound with margin."""
    bound = PEAK_BYTES_PER_PIXEL * SIDE * SIDE
    peaks = {}
    for name, data in worst_cases().items():
        pool = DecodePool(1, SIDE * SIDE)  # a fresh worker: no memory kept from another
        try:
            found = pool.measure(data, 32, SIDE * SIDE, None, time.monotonic() + 60)
        finally:
            pool.close()
        peaks[name] = (found["VmHWM"] - found["VmRSS"]) / 2**20
        assert found["RLIMIT_AS"] - found["VmSize"] > bound + 128 * 2**20
        assert found["RLIMIT_AS"] <= found["VmSize"] + address_space_for(SIDE * SIDE)
    assert max(peaks.values()) < bound / 2**20, peaks
    assert max(peaks.values()) > bound / 2**20 / 2, peaks  # the bound is not loose either
