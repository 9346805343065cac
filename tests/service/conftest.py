"""Fixtures of the service tests: onnxruntime on the shared tiny model (the reference every
answer is compared with), the real app under uvicorn on 127.0.0.1, the app in-process with
small limits, and five images to send."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import API_KEY, Live, encode, running, serve_in_thread, tiny_images


@pytest.fixture(scope="session")
def reference(tiny_onnx: Path):
    """The shared tiny model opened directly: what every answer is compared with."""
    from center_embed.runtime import OnnxModel, RuntimeOptions

    return OnnxModel(tiny_onnx, RuntimeOptions(device="cpu"))


@pytest.fixture(scope="session")
def live(tiny_onnx: Path) -> Iterator[Live]:
    """The real app under uvicorn on 127.0.0.1, with an API key required. Shared by the
    service tests and the fuzzer: tests that read its counters compare before and after."""
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    app = create_app(Settings(model=tiny_onnx, api_keys=[API_KEY], max_wait_ms=5))
    with serve_in_thread(app) as server:
        yield server


@pytest.fixture(scope="session")
def images() -> list[bytes]:
    """Five images of several formats and sizes (resize and crop paths included)."""
    pixels = tiny_images(4)
    wide = np.asarray(Image.fromarray(tiny_images(1, seed=7, size=48)[0]).crop((0, 0, 48, 40)))
    return [
        encode(pixels[0]),
        encode(pixels[1], "JPEG", quality=95),
        encode(pixels[2], "BMP"),
        encode(pixels[3], "WEBP", lossless=True),
        encode(wide),
    ]


@pytest.fixture(scope="session")
def client(tiny_onnx: Path):
    """The app in-process (TestClient) with small limits: 8 images, 4 vectors, 256 KiB."""
    with running(tiny_onnx, max_images=8, max_vectors=4, max_body_bytes=256 * 1024) as c:
        yield c
