"""Decoding untrusted images: bounded work, an allowlist, and the right pixels."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from center_embed.imageio import (
    ImageDecodeError,
    ImageFormatError,
    decode_image,
    fit_image,
    image_extensions,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def resize_then_crop(image: Image.Image, size: int) -> np.ndarray:
    """The policy as first written: resize the whole image, then crop its centre."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("shape", [(40, 33), (100, 7), (7, 100), (64, 48), (20, 31), (500, 97)])
def test_fit_image_gives_the_pixels_of_resize_then_crop(shape):
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    got = fit_image(image, 32)
    want = resize_then_crop(image, 32)
    assert got.shape == (32, 32, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1  # Pillow's fixed-point rounding of a fractional box, nothing more


def test_a_needle_image_never_becomes_a_huge_intermediate():
    """A 1×1,000,000 PNG (a few KB) once became 32×32,000,000 pixels (5 GB) in memory."""
    code = (
        "import io, resource, time\n"
        "from PIL import Image\n"
        "from center_embed.imageio import decode_image\n"
        "for size in [(1, 1_000_000), (1_000_000, 1)]:\n"
        "    buf = io.BytesIO(); Image.new('L', size).save(buf, 'PNG')\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    t = time.perf_counter(); out = decode_image(buf.getvalue(), 32)\n"
        "    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "    print(len(buf.getvalue()), out.shape, grown, time.perf_counter() - t)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        grown_kb, seconds = line.rsplit(" ", 2)[1:]
        assert "(32, 32, 3)" in line
        assert int(grown_kb) < 64 * 1024, line  # KB: far below the 5 GB of the old path
        assert float(seconds) < 2.0, line


def test_only_allowed_formats_are_decoded():
    small = Image.new("RGB", (16, 16), (200, 10, 10))
    ico = encode(small, "ICO")
    with pytest.raises(ImageFormatError, match="ICO images are not accepted"):
        decode_image(ico, 8)
    assert decode_image(ico, 8, formats=None).shape == (8, 8, 3)  # Pillow can; we refuse
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageFormatError, match="EPS images are not accepted"):
        decode_image(eps, 8)
    with pytest.raises(ImageFormatError):
        decode_image(encode(small, "PNG"), 8, formats=["JPEG"])
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode_image(encode(small, fmt), 8).shape == (8, 8, 3)


def test_junk_is_not_an_image_rather_than_a_refused_format():
    with pytest.raises(ImageDecodeError, match="not an image format") as info:
        decode_image(b"\x00junk" * 10, 8)
    assert not isinstance(info.value, ImageFormatError)


def test_image_extensions_follow_the_allowlist():
    extensions = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= extensions
    assert not {".eps", ".ico", ".psd", ".pdf"} & extensions


def gradient(size: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)  # (size, size) grey levels


@pytest.mark.parametrize(
    ("mode", "fmt", "to_pixels"),
    [
        ("I;16", "PNG", lambda g: g.astype(np.uint16) * 257),
        ("I;16", "TIFF", lambda g: g.astype(np.uint16) * 257),
        ("I", "TIFF", lambda g: g.astype(np.int32) * 257),
        ("F", "TIFF", lambda g: g.astype(np.float32) / 255),
        ("F", "TIFF", lambda g: g.astype(np.float32) * 257),
    ],
)
def test_deep_pixels_are_scaled_not_clipped(mode, fmt, to_pixels):
    """16-bit, 32-bit and float greys once all became 255 (a cat served as "airplane")."""
    grey = gradient()
    deep = Image.fromarray(to_pixels(grey))
    assert deep.mode == mode
    got = decode_image(encode(deep, fmt), 32)
    want = decode_image(encode(Image.fromarray(grey), "PNG"), 32)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_exif_orientation_is_applied():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; rotate 270° to view
    tagged = encode(Image.fromarray(pixels), "PNG", exif=exif)
    upright = encode(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270), "PNG")
    np.testing.assert_array_equal(decode_image(tagged, 32), decode_image(upright, 32))


def test_a_large_needle_is_cheap_too():
    data = encode(Image.new("L", (4_000_000, 1)), "PNG")
    started = time.perf_counter()
    assert decode_image(data, 32).shape == (32, 32, 3)
    assert time.perf_counter() - started < 2.0
