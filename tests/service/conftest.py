"""Fixtures of the service tests: onnxruntime on the shared tiny model (the reference every
answer is compared with) and the real app under uvicorn on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import API_KEY, Live, serve_in_thread


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
