"""The fast JPEG path of center_embed.imageio (simplejpeg): the same pixels as Pillow's,
and every limit and error as before (issue 13, "Decoding").

The reference is Pillow's path itself, reached by switching the fast path off
(`imageio.simplejpeg = None`), never the function under test.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from center_embed import imageio
from center_embed.imageio import ImageDecodeError, ImageTooLargeError, decode_image

simplejpeg = pytest.importorskip("simplejpeg")


def jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def pillow_path(monkeypatch, data: bytes, size: int, max_pixels=None) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(imageio, "simplejpeg", None)
        return decode_image(data, size, max_pixels)


@pytest.fixture()
def fast_calls(monkeypatch) -> list[int]:
    """Counts the JPEGs simplejpeg decoded, so a test sees the fast path was taken."""
    calls: list[int] = []
    real = simplejpeg.decode_jpeg

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", counting)
    return calls


@pytest.mark.parametrize(
    ("shape", "mode", "save"),
    [
        ((32, 32), "RGB", {}),  # CIFAR-sized: passed through
        ((75, 120), "RGB", {}),  # resized and cropped
        ((64, 48), "L", {}),  # greyscale
        ((40, 40), "RGB", {"subsampling": 0}),  # 4:4:4
        ((33, 57), "RGB", {"progressive": True}),
    ],
)
def test_fast_path_gives_pillows_pixels(monkeypatch, fast_calls, shape, mode, save):
    data = jpeg(textured(*shape), mode, **save)
    expected = pillow_path(monkeypatch, data, 32)
    got = decode_image(data, 32)
    assert fast_calls == [1]
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, expected)


def test_cmyk_and_corrupt_jpegs_go_through_pillow(monkeypatch):
    cmyk = jpeg(textured(40, 40), "CMYK")
    np.testing.assert_array_equal(decode_image(cmyk, 32), pillow_path(monkeypatch, cmyk, 32))
    good = jpeg(textured(64, 64))
    for broken in (good[: len(good) // 2], good[:3] + b"garbage" * 20):
        with pytest.raises(ImageDecodeError) as fast:
            decode_image(broken, 32)
        with pytest.raises(ImageDecodeError) as slow:
            pillow_path(monkeypatch, broken, 32)
        assert str(fast.value) == str(slow.value)


def test_pixel_limits_hold_before_decoding(monkeypatch, fast_calls):
    data = jpeg(textured(100, 100))
    with pytest.raises(ImageTooLargeError, match="more than the limit of 9999"):
        decode_image(data, 32, max_pixels=9_999)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(data, 32)
    assert fast_calls == []  # refused from the header, never decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert decode_image(data, 32, max_pixels=10_000).shape == (32, 32, 3)


def test_fast_decoding_releases_the_gil():
    """Two threads decoding while the main thread counts: with the GIL held for the whole
    decode, the counter would stall; it keeps most of its pace."""
    data = jpeg(textured(1024, 1024))
    stop = threading.Event()

    def count() -> int:
        n = 0
        while not stop.is_set():
            n += 1
        return n

    def decode_for(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            simplejpeg.decode_jpeg(data, colorspace="RGB")

    worker = threading.Thread(target=decode_for, args=(0.3,))
    worker.start()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    busy = count()
    worker.join()
    stop.clear()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    alone = count()
    assert busy > 0.3 * alone


def test_a_jpeg_with_exif_orientation_is_turned_as_pillows_path_turns_it(monkeypatch):
    pixels = textured(40, 64, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the image is viewed rotated by 270°
    tagged = jpeg(pixels, exif=exif)
    got = decode_image(tagged, 32)
    np.testing.assert_array_equal(got, pillow_path(monkeypatch, tagged, 32))
    unrotated = decode_image(jpeg(pixels), 32)
    assert np.abs(got.astype(int) - unrotated.astype(int)).mean() > 10  # it did turn


def test_the_fast_path_keeps_the_format_allowlist():
    with pytest.raises(imageio.ImageFormatError, match="JPEG images are not accepted"):
        decode_image(jpeg(textured(32, 32)), 32, formats=["PNG"])
