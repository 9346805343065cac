"""The Python client's inputs, through the real app: image modes PNG cannot hold, float
arrays, channels-first and RGBA arrays, and errors named as the caller named the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from center_embed.service.client import BadRequest, Client
from tests.helpers import API_KEY, encode, tiny_images

CORRUPT = b"\x89PNG\r\n\x1a\n" + b"junk" * 8


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.stack(tiny_images(2, seed=11))


def test_a_cmyk_image_is_sent_as_rgb(live, reference, pixels):
    cmyk = Image.fromarray(pixels[0]).convert("CMYK")
    expected = reference.run(np.asarray(cmyk.convert("RGB"))[None])["embeddings"]
    with Client(live.url, api_key=API_KEY) as client:
        close(client.embed(cmyk), expected)
        ycbcr = Image.fromarray(pixels[1]).convert("YCbCr")
        rgb = np.asarray(ycbcr.convert("RGB"))[None]
        close(client.embed(ycbcr), reference.run(rgb)["embeddings"])


def test_float_arrays_in_0_1_and_0_255(live, reference, pixels):
    expected = reference.run(pixels)["embeddings"]
    with Client(live.url, api_key=API_KEY) as client:
        close(client.embed(pixels.astype(np.float32) / 255.0), expected)  # [0, 1]: scaled
        close(client.embed(pixels.astype(np.float64)), expected)  # [0, 255]: as they are
        close(client.embed(pixels.astype(np.int64)), expected)
        with pytest.raises(ValueError, match=r"image\[1\]: pixel values must lie in \[0, 255\]"):
            client.embed([pixels[0], pixels[1] - 300.0])
        with pytest.raises(ValueError, match=r"image\[0\]: pixel values .* nan"):
            client.embed(np.full((4, 4, 3), np.nan))


def test_channels_first_is_refused_and_rgba_drops_alpha(live, reference, pixels):
    rgba = np.concatenate([pixels[0], np.full((32, 32, 1), 7, np.uint8)], axis=-1)
    with Client(live.url, api_key=API_KEY) as client:
        with pytest.raises(ValueError, match=r"\(3, 32, 32\) looks channels-first: pass array"):
            client.embed(pixels[0].transpose(2, 0, 1))
        close(client.embed(rgba), reference.run(pixels[:1])["embeddings"])
        with pytest.raises(ValueError, match=r"image\[0\]: arrays are .* got \(32, 32, 5\)"):
            client.embed(np.zeros((32, 32, 5), np.uint8))


def test_junk_is_reported_under_the_callers_name(live, pixels, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "junk.png").write_bytes(CORRUPT)
    with Client(live.url, api_key=API_KEY) as client:
        with pytest.raises(BadRequest) as bad:
            client.embed([encode(pixels[0]), CORRUPT])
        assert bad.value.message.startswith('files[1] ("image[1]"): ')
        assert "image1.png" not in bad.value.message
        with pytest.raises(BadRequest) as bad:
            client.embed([pixels[0], "sub/junk.png"])
        assert bad.value.message.startswith('files[1] ("sub/junk.png"): ')


def test_client_has_a_docstring_with_an_example():
    assert "with Client(" in Client.__doc__ and "client.embed(" in Client.__doc__


def test_a_batch_in_a_list_and_more_images_than_one_request_takes(tiny_onnx, reference):
    """A (N, H, W, C) array inside a list is N images; more images than the service's
    max_images (or max_body_bytes) go as several requests, answered in the given order."""
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings
    from tests.helpers import serve_in_thread

    images = np.stack(tiny_images(11, seed=12))
    expected = reference.run(images)
    app = create_app(Settings(model=tiny_onnx, max_images=4, max_wait_ms=5))
    with serve_in_thread(app) as server, Client(server.url) as client:
        calls = []
        original = client._send
        client._send = lambda method, path, **kw: calls.append(path) or original(method, path, **kw)
        close(client.embed([images[:2], images[2]]), expected["embeddings"][:3])
        got = client.classify(list(images))
        assert [c.label for c in got] == expected["labels"].tolist()
        np.testing.assert_allclose([c.min_distance for c in got], expected["min_distances"],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        # /v1/model once, then 1 + 3 requests of at most 4 images
        assert calls == ["/v1/model", "/v1/embed", *["/v1/classify"] * 3]
        client._limits["max_body_bytes"] = 2 * len(encode(images[0])) + 400
        assert len(client._batches([("a", encode(images[0]), "image/png")] * 5)) == 3
        with pytest.raises(ValueError, match="no images given"):
            client.classify([])
