"""The Python client (center_embed.service.client) against the live service: every input
kind, every answer, every error code mapped to its exception, and no web framework imported."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    API_KEY,
    CORRUPT,
    encode,
    free_port,
    tiny_images,
)


def test_client_maps_every_error_code():
    from center_embed.service.client import (
        EXCEPTION_BY_STATUS,
        Client,
        Overloaded,
        ServiceError,
    )
    from center_embed.service.error_codes import ErrorCode

    assert set(EXCEPTION_BY_STATUS) | {404, 405, 500} == {code.status for code in ErrorCode}
    for code in ErrorCode:
        body = {"error": {"code": code.value, "message": "why"}}
        with pytest.raises(ServiceError) as raised:
            Client._answer(httpx.Response(code.status, json=body))
        assert type(raised.value) is EXCEPTION_BY_STATUS.get(code.status, ServiceError)
        assert raised.value.code is code and raised.value.code == code.value
        assert (raised.value.status, raised.value.message) == (code.status, "why")
        assert str(raised.value) == f"{code.status} {code.value}: why"
    with pytest.raises(Overloaded) as raised:  # not the service's JSON: a proxy's page
        Client._answer(httpx.Response(429, text="<html>slow down</html>"))
    assert (raised.value.code, raised.value.message) == ("http_error", "<html>slow down</html>")


def test_client_imports_no_web_framework():
    code = (
        "import sys, center_embed.service.client; "
        "print([m for m in ('fastapi', 'starlette', 'pydantic', 'torch') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_client(live, reference, images, tmp_path):
    from center_embed.service.client import (
        BadRequest,
        Classification,
        Client,
        ConnectionFailed,
        Unauthorized,
        ValidationFailed,
    )

    pixels = tiny_images(3, seed=5)
    path = tmp_path / "cat.png"
    path.write_bytes(encode(pixels[0]))
    ref = reference.run(np.stack(pixels))
    with Client(live.url, api_key=API_KEY) as client:
        inputs = [path, encode(pixels[1]), Image.fromarray(pixels[2])]
        np.testing.assert_allclose(client.embed(inputs), ref["embeddings"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            client.embed(np.stack(pixels)), ref["embeddings"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            client.embed(str(path))[0], ref["embeddings"][0], rtol=1e-5, atol=1e-6
        )
        results = client.classify(pixels[0], top_k=2, return_embeddings=True)
        assert isinstance(results[0], Classification) and len(results[0].distances) == 2
        assert results[0].label == int(ref["labels"][0])
        assert results[0].embedding.shape == (reference.info.embedding_dim,)
        assert results[0].atypicality == pytest.approx(float(ref["atypicality"][0]), abs=1e-4)
        via_vectors = client.distances(ref["embeddings"])
        assert [r.label for r in via_vectors] == ref["labels"].tolist()
        assert all(r.atypicality is None for r in via_vectors)  # a vector has no image
        names, centers = client.centers()
        assert names == reference.info.class_names and centers.shape[0] == len(names)
        assert client.model()["provider"] == "CPUExecutionProvider"
        assert client.ready()

        with pytest.raises(BadRequest) as bad:
            client.classify([encode(pixels[0]), CORRUPT])
        assert bad.value.status == 400 and bad.value.code == "bad_image"
        assert bad.value.message.startswith('files[1] ("image[1]"): corrupt or truncated')
        with pytest.raises(ValidationFailed, match="embedding dim is 16"):
            client.distances([1.0, 2.0])
        with pytest.raises(ValueError, match="image\\[0\\]: pixel values must lie in"):
            client.embed(np.full((4, 4, 3), 300.0, np.float32))
    with Client(live.url) as anonymous, pytest.raises(Unauthorized, match="missing API key"):
        anonymous.embed(path)
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as nowhere:
        assert not nowhere.ready()
        with pytest.raises(ConnectionFailed):
            nowhere.model()
