"""center_embed.imageio's JPEG layout walk: scans counted (too many refused before decoding),
EXIF orientation found wherever its APP1 segment lies, truncation seen; deep pixels converted
band by band as before."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from center_embed import imageio
from center_embed.imageio import MAX_JPEG_SCANS, ImageDecodeError, decode_image, jpeg_layout


def jpeg(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def repeated_scan_jpeg(side: int = 1024, scans: int = 10_000) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans (the attack
    held a decoder 17 s at 4096²)."""
    data = jpeg(np.zeros((side, side, 3), np.uint8), progressive=True)
    sos = [m.start() for m in re.finditer(rb"\xff\xda", data)]
    last = data[sos[-1] : data.rindex(b"\xff\xd9")]
    return data[: sos[-1]] + last * (scans - len(sos) + 1) + b"\xff\xd9"


def with_segments_before(data: bytes, *segments: bytes) -> bytes:
    """`data` with these whole segments right after its SOI marker."""
    return data[:2] + b"".join(segments) + data[2:]


def comment(size: int) -> bytes:
    return b"\xff\xfe" + (size + 2).to_bytes(2, "big") + b"c" * size


def test_scans_are_counted_as_encoders_write_them():
    pixels = textured(64, 64)
    assert jpeg_layout(jpeg(pixels)).scans == 1
    progressive = jpeg_layout(jpeg(pixels, progressive=True))
    assert 2 < progressive.scans <= 12 and progressive.complete
    assert not jpeg_layout(jpeg(pixels)[:-400]).complete  # truncated


def test_too_many_scans_are_refused_before_decoding():
    attack = repeated_scan_jpeg()
    assert jpeg_layout(attack).scans == MAX_JPEG_SCANS + 1  # counting stops past the limit
    for call in (lambda: decode_image(attack, 32), lambda: imageio.image_size(attack)):
        started = time.perf_counter()
        with pytest.raises(ImageDecodeError, match=f"more than {MAX_JPEG_SCANS} scans"):
            call()
        assert time.perf_counter() - started < 0.5
    at_limit = repeated_scan_jpeg(64, MAX_JPEG_SCANS)
    assert decode_image(at_limit, 32).shape == (32, 32, 3)


def test_exif_orientation_beyond_64_kib_is_applied(monkeypatch):
    pixels = textured(40, 64, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewed rotated by 270°
    tagged = jpeg(pixels, exif=exif)
    # Move the EXIF segment (right after SOI) behind two comments: it starts past 64 KiB.
    app1 = tagged.index(b"\xff\xe1")
    length = int.from_bytes(tagged[app1 + 2 : app1 + 4], "big")
    exif_segment = tagged[app1 : app1 + 2 + length]
    far = with_segments_before(
        tagged[:app1] + tagged[app1 + 2 + length :], comment(65_000), comment(65_000), exif_segment
    )
    assert far.index(b"Exif\x00\x00") > 65_536
    assert jpeg_layout(far).oriented
    upright = np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270))
    want = decode_image(jpeg(upright), 32)
    got = decode_image(far, 32)
    with monkeypatch.context() as m:  # Pillow's path alone turns it the same way
        m.setattr(imageio, "simplejpeg", None)
        np.testing.assert_array_equal(got, decode_image(far, 32))
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 8  # turned (JPEG re-encoded)
    unturned = decode_image(jpeg(pixels), 32)
    assert np.abs(got.astype(int) - unturned.astype(int)).mean() > 10


def test_xmp_orientation_goes_to_pillows_path():
    xmp = b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'
    segment = b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
    data = with_segments_before(jpeg(textured(40, 64)), segment)
    assert jpeg_layout(data).oriented
    assert imageio.decode_jpeg_fast(data, 32, None) is None


def test_a_jpeg_with_extraneous_bytes_decodes_once_like_pillow(monkeypatch):
    """libjpeg warns about junk between segments; Pillow decodes anyway and so does the fast
    path (non-strict), in one decode."""
    good = jpeg(textured(48, 48))
    eoi = good.rindex(b"\xff\xd9")
    junk = good[:eoi] + b"\x00\x01\x02" + good[eoi:]
    calls = []
    real = imageio.simplejpeg.decode_jpeg
    monkeypatch.setattr(
        imageio.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    got = decode_image(junk, 32)
    assert calls == [1]
    monkeypatch.setattr(imageio, "simplejpeg", None)
    np.testing.assert_array_equal(got, decode_image(junk, 32))


# --------------------------------------------------------------------------- decode_cost


@pytest.mark.parametrize("progressive", [False, True])
def test_decode_cost_reads_a_jpegs_frame_header(progressive):
    data = jpeg(textured(24, 40), progressive=progressive)
    cost = 24 * 40 * (imageio.PROGRESSIVE_PASSES if progressive else 1)
    assert imageio.decode_cost(data) == cost
    # Behind 60 KB of other segments (EXIF, comments) it is still found; further, not.
    assert imageio.decode_cost(with_segments_before(data, comment(60_000))) == cost
    assert imageio.decode_cost(with_segments_before(data, *[comment(60_000)] * 2)) is None


def test_decode_cost_reads_a_pngs_ihdr_and_nothing_else():
    def encoded(fmt: str, size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size).save(buf, fmt)
        return buf.getvalue()

    assert imageio.decode_cost(encoded("PNG", (4096, 3))) == 4096 * 3
    for fmt in ("WEBP", "GIF", "BMP", "TIFF"):  # the large images' pool takes these
        assert imageio.decode_cost(encoded(fmt, (8, 8))) is None
    assert imageio.decode_cost(b"") is None
    assert imageio.decode_cost(b"\xff\xd8\xff") is None  # a JPEG cut after its magic
    scan_first = b"\xff\xd8\xff\xda\x00\x08" + bytes(6) + b"\xff\xc0\x00\x11\x08\x01\x00\x01\x00"
    assert imageio.decode_cost(scan_first) is None  # a scan before any frame header


def test_decode_cost_takes_a_bounded_number_of_steps():
    """It runs on the event loop: a header of fill bytes or restart markers (64 KB of them,
    65,536 steps of Python) is given up after SNIFF_STEPS, before its frame header."""
    data = jpeg(textured(24, 40))
    few = imageio.SNIFF_STEPS - 10
    assert imageio.decode_cost(data[:2] + b"\xff" * few + data[2:]) == 24 * 40
    for filler in (b"\xff", b"\xff\xd0"):
        padded = data[:2] + filler * (60_000 // len(filler)) + data[2:]
        assert imageio.decode_cost(padded) is None
