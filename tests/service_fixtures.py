"""Fixtures and helpers for the service tests: the tiny model exported to ONNX, a live
uvicorn server on 127.0.0.1, and image bytes of every kind (good, corrupt, bombs).

Test modules import the fixtures they use by name (pytest finds them in the module).
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny_images

API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def served_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported (and verified) by export_checkpoint."""
    from center_embed.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("served") / "tiny.onnx")


@pytest.fixture(scope="session")
def reference(served_onnx: Path):
    """The same model opened directly: what every answer is compared with."""
    from center_embed.runtime import OnnxModel

    return OnnxModel(served_onnx, device="cpu")


@dataclass
class Live:
    url: str
    app: object
    server: object


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 20.0) -> Iterator[Live]:
    """Run `app` under uvicorn on 127.0.0.1 (a free port) in a thread, until ready."""
    import httpx
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not become ready")
        time.sleep(0.02)
    try:
        yield Live(url, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout)


@pytest.fixture(scope="session")
def live(served_onnx: Path) -> Iterator[Live]:
    """The real app under uvicorn on 127.0.0.1, with an API key required."""
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    app = create_app(Settings(model=served_onnx, api_keys=[API_KEY], max_wait_ms=5))
    with serve_in_thread(app) as server:
        yield server


# --------------------------------------------------------------------------- images


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def tiny_images(n: int, seed: int = 1, size: int = 32) -> list[np.ndarray]:
    """n images like the tiny training set, cycling through the three classes."""
    rng = np.random.default_rng(seed)
    return [make_tiny_images(1, i % 3, rng, size)[0] for i in range(n)]


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 1-bit pixels, with a tiny IDAT: a
    decompression bomb as a decoder sees it before it inflates anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )
