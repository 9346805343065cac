"""Decoding one image into the uint8 pixels every part of center-embed agrees on.

Needs numpy and Pillow only (no torch): training, export calibration, the HTTP service
and the batch scorer all decode through `decode_image`, so they can never disagree.

Resize policy: EXIF orientation is applied, the image is converted to RGB (16-bit, 32-bit
and float pixels are scaled to 8 bits, not clipped), its shorter side is resized to the
model's input size with Pillow's bilinear filter (antialiased when shrinking), and the
centre is cropped to a square. The resize reads only the source box of that square, so the
output is (size, size) whatever the aspect ratio: a 1×1,000,000 image never becomes a
32×32,000,000 intermediate. An image already at the input size is passed through untouched.

Memory: one decode takes at most PEAK_BYTES_PER_PIXEL (20) bytes per pixel of the image
beyond its encoded bytes: 320 MiB at the service's default limit of 4096² pixels. Measured
(peak RSS of a decode process above its RSS with the bytes received; tests/service/
test_decode_pool.py repeats it) for the worst case of each allowed format at 4096²:
WebP lossless RGBA 256 MiB (16 B/px: libwebp's ARGB buffer, Pillow's RGBA, the RGB copy);
progressive CMYK JPEG 193 MiB (12: libjpeg's coefficients, CMYK, RGB); progressive 4:4:4 JPEG
with EXIF orientation 161 MiB (10: the turned copy); float32 or int32 TIFF 162 MiB (10: the
32-bit image, libtiff's strip, then 8-bit grey and RGB, the float64 arithmetic done in
1 Mpixel bands); 16-bit PNG 137 MiB (8.6); RGBA PNG with EXIF orientation 129 MiB (8);
CMYK TIFF 129 MiB (8); GIF 81 MiB (4.7). Before the bands, a float32 TIFF took 4 times its
8-bit size (~540 MB at 4096²), and every image a full copy for exif_transpose.

Only an allowlist of formats is decoded (`SAFE_FORMATS`): Pillow can open many more, some
through external programs (EPS through Ghostscript) or with containers that decode an inner
image inside `Image.open` (ICO), which untrusted bytes must never reach.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats decoded by default, by Pillow's format names: common, pure-decoder formats.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# The most memory one decode_image call takes beyond its input bytes, per pixel of the image,
# at the worst format (module docstring, "Memory"): what a caller bounds decoding memory with.
PEAK_BYTES_PER_PIXEL = 20

# We refuse images above Pillow's bomb limit ourselves (below), before decoding; Pillow's
# own warning at that limit would only print plain text to stderr. Set once at import (a
# filter changed per call would race between decoding threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode (or decoding failed part-way)."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed."""


class ImageFormatError(ImageDecodeError):
    """The bytes are an image, but of a format outside the allowed list."""


def known_formats() -> set[str]:
    """Every format name Pillow can open here (what an allowlist may name)."""
    Image.init()
    return set(Image.OPEN)


def image_extensions(formats: Collection[str] = SAFE_FORMATS) -> set[str]:
    """File extensions of the allowed formats (lower case, with the dot)."""
    Image.init()
    allowed = {f.upper() for f in formats}
    return {
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt in allowed
    }


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB, shorter side resized to `size`, centre-cropped: uint8 (size, size, 3).

    The pixels of resizing the whole image and cropping its centre, within one grey level
    (Pillow samples the source box on the same grid with the same filter support; only its
    fixed-point rounding of a fractional box differs), at the cost of the output only.
    """
    image = to_rgb(image)
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        sx, sy = w / new_w, h / new_h  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pixels deeper than 8 bits are scaled to 0..255 by their range, where
    Pillow's convert("RGB") would clip them (a 16-bit photo would turn white)."""
    if image.mode == "RGB":
        return image
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image.convert("RGB")
    # Band by band (BAND_PIXELS at a time), so that the float64 arithmetic costs a few MB
    # whatever the image's size, not 8 bytes per pixel several times over.
    w, h = image.size
    rows = max(1, BAND_PIXELS // max(w, 1))
    bands = [(0, y, w, min(y + rows, h)) for y in range(0, h, rows)]
    if image.mode.startswith("I;16"):
        divide = 257.0
    else:  # by the range the values fit in: their maximum over the whole image first
        top = max((float(_clean(image.crop(b)).max(initial=0.0)) for b in bands), default=0.0)
        divide = _range_divisor(top, fractions=image.mode == "F")
    gray = np.empty((h, w), np.uint8)
    for box in bands:
        values = _clean(image.crop(box))
        if divide == FRACTIONS:
            values *= 255.0
        elif divide == FULL_32_BIT:
            values /= 2**32 - 1
            values *= 255.0
        elif divide != 1.0:
            values /= divide
        gray[box[1] : box[3]] = np.rint(values, out=values).clip(0, 255, out=values)
    return Image.fromarray(gray, "L").convert("RGB")


BAND_PIXELS = 1 << 20  # deep pixels are converted to 8 bits this many at a time (8 MB)
FRACTIONS, FULL_32_BIT = -1.0, -2.0  # _range_divisor's two rules that are not one division


def _clean(band: Image.Image) -> np.ndarray:
    """Grey levels as float64, NaN and infinities as 0, negatives as 0."""
    values = np.asarray(band, dtype=np.float64)
    values = np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return values.clip(min=0.0, out=values)


def _range_divisor(top: float, fractions: bool) -> float:
    """How 32-bit integer or float grey levels go to 0..255, by the range their maximum
    `top` fits in: float values within [0, 1] are fractions of white (FRACTIONS); otherwise
    8-bit (1.0), 16-bit (257.0) or 32-bit (FULL_32_BIT) ranges."""
    if fractions and top <= 1.0:
        return FRACTIONS
    if top <= 255:
        return 1.0
    if top <= 65535:
        return 257.0
    return FULL_32_BIT


def decode_image(
    data: bytes | Path | str,
    size: int,
    max_pixels: int | None = None,
    formats: Collection[str] | None = SAFE_FORMATS,
) -> np.ndarray:
    """Decode bytes or a file into uint8 (size, size, 3) RGB, raising ImageDecodeError.

    `max_pixels` rejects images larger than that before decoding them fully; Pillow's own
    decompression-bomb limit is enforced either way (above it, not only twice above it).
    `formats` is the allowlist (Pillow format names; None: every format Pillow opens):
    other formats raise ImageFormatError before any of their data is decoded.
    """
    if isinstance(data, bytes | bytearray) and data[:3] == JPEG_MAGIC:
        layout = check_jpeg(data)  # too many scans: refused before anything is decoded
        fast = decode_jpeg_fast(data, size, max_pixels, formats, layout)
        if fast is not None:
            return fast
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    with _decode_errors(), _open(source, formats) as image:
        check_size(image.width, image.height, max_pixels)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # a copy only when it must turn
        return fit_image(image, size)


def check_size(width: int, height: int, max_pixels: int | None) -> None:
    """ImageTooLargeError for an image over `max_pixels` or over Pillow's bomb limit."""
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} pixels, more than the limit of {max_pixels}"
        )
    # Pillow raises above twice its limit and only warns above it; refuse both here,
    # without a process-wide warnings filter (decoding runs in many threads).
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"image rejected as a decompression bomb: {pixels} pixels exceeds "
            f"Pillow's limit of {Image.MAX_IMAGE_PIXELS}"
        )


def image_size(data: bytes, formats: Collection[str] | None = SAFE_FORMATS) -> tuple[int, int]:
    """(width, height) from the header alone, raising as decode_image would (ImageFormatError
    for a refused format): what a caller budgets decoding time and memory with."""
    if data[:3] == JPEG_MAGIC:
        check_jpeg(data)  # too many scans: refused before anything is decoded
    with _decode_errors(), _open(io.BytesIO(data), formats) as image:
        return image.size


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's many exceptions on bad bytes, as ImageDecodeError and its subclasses."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image format Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Truncated or corrupt data surfaces as OSError ("image file is truncated") etc.
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None


def _open(source: io.BytesIO | Path | str, formats: Collection[str] | None) -> Image.Image:
    """Image.open restricted to `formats`, telling "not allowed" (ImageFormatError) from
    "not an image" (UnidentifiedImageError) by the header bytes alone: opening the file
    with every plugin to find out would run the very decoders the allowlist keeps out."""
    if formats is None:
        return Image.open(source)
    allowed = [f.upper() for f in formats]
    try:
        return Image.open(source, formats=allowed)
    except UnidentifiedImageError:
        found = _sniff_format(source)
        if found is None or found in allowed:
            raise
        raise ImageFormatError(
            f"{found} images are not accepted (allowed: {', '.join(allowed)})"
        ) from None


def _sniff_format(source: io.BytesIO | Path | str) -> str | None:
    """The Pillow format whose header check accepts the first bytes, if any."""
    if isinstance(source, io.BytesIO):
        prefix = source.getvalue()[:64]
    else:
        with open(source, "rb") as f:
            prefix = f.read(64)
    return next(_accepting(prefix), None)


def _accepting(prefix: bytes) -> Iterator[str]:
    """The Pillow formats whose header check (`accept`) passes on these first bytes."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            accepted = accept is not None and accept(prefix)
        except struct.error:  # some checks (DIB's) unpack 4 bytes from any prefix
            accepted = False
        if accepted:
            yield name


# --------------------------------------------------------------------------- JPEG layout
#
# A JPEG is read marker by marker before any decoder sees it (`jpeg_layout`): its segments
# are skipped by their lengths and its entropy-coded data searched for the next marker (in C,
# by a regular expression), so the walk costs microseconds for a small image and a few ms for
# a 30 MB one, bounded by the file's size. It tells
# - how many scans (SOS markers) the file holds: a baseline JPEG has one, libjpeg's and
#   mozjpeg's progressive scripts ten or so, the most elaborate encoders' scripts a few dozen;
#   MAX_JPEG_SCANS (100) is well above all of them, and a file with more is refused before
#   decoding (each scan is a pass over the whole coefficient buffer: 10,000 repeated scans of
#   a 4096² image held a decoder for 17 s);
# - whether an APP1 segment before the first scan carries EXIF or XMP orientation (where
#   Pillow looks for them), wherever it lies in the header;
# - whether the file ends with its end-of-image marker (a truncated file does not).

MAX_JPEG_SCANS = 100
JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
# A marker in entropy-coded data: 0xFF not followed by a stuffed zero, a restart marker
# (0xD0-0xD7) or another 0xFF (fill bytes before a marker).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RSTn, SOI


@dataclass(frozen=True)
class JpegLayout:
    scans: int  # SOS markers, counted up to MAX_JPEG_SCANS + 1
    oriented: bool  # an EXIF or XMP-with-orientation APP1 segment before the first scan
    complete: bool  # every segment's length fits the file, and it ends with EOI


def jpeg_layout(data: bytes) -> JpegLayout:
    """The segments of JPEG bytes, walked without decoding (see above)."""
    scans, oriented, pos, n = 0, False, 2, len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:  # junk between segments (libjpeg skips it, and so do we)
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return JpegLayout(scans, oriented, True)
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > n or end < pos + 4:
            break
        if marker == 0xE1 and scans == 0:
            payload = data[pos + 4 : min(end, pos + 4 + len(_XMP))]
            if payload.startswith(_EXIF) or (
                payload == _XMP and b"tiff:Orientation" in data[pos + 4 : end]
            ):
                oriented = True
        if marker != 0xDA:
            pos = end
            continue
        scans += 1
        if scans > MAX_JPEG_SCANS:
            break
        found = _NEXT_MARKER.search(data, end)
        if found is None:
            break
        pos = found.start()
    return JpegLayout(scans, oriented, False)


def check_jpeg(data: bytes) -> JpegLayout:
    """The layout of JPEG bytes, or ImageDecodeError for more scans than any encoder writes."""
    layout = jpeg_layout(data)
    if layout.scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            f"JPEG with more than {MAX_JPEG_SCANS} scans (SOS markers): no encoder writes "
            "that many, and each costs a pass over the whole image"
        )
    return layout


# --------------------------------------------------------------------------- fast JPEG
#
# simplejpeg (libjpeg-turbo, bundled in its wheel; it releases the GIL while decoding) gives
# the same pixels as Pillow's JPEG decoder (both use libjpeg-turbo's default accurate DCT and
# fancy upsampling) at a fifth to a third of the cost on 32x32 JPEGs, where Pillow's per-image
# overhead dominates. Which decoder handles the bytes is decided once, from the header and the
# layout, before either decodes anything: simplejpeg takes complete YCbCr or grey JPEGs within
# the pixel limits and without orientation to apply; everything else (other formats,
# CMYK, truncated data, EXIF or XMP orientation, an image over a limit) goes to Pillow, which
# raises the one canonical error. A failure of the chosen decoder is final: the bytes are
# never decoded twice. simplejpeg runs non-strict, as Pillow's decoder does (libjpeg's
# warnings, such as extraneous bytes before a marker, do not refuse the image; truncation,
# which Pillow refuses, never reaches it).

try:
    import simplejpeg
except ImportError:  # an optional speed-up: Pillow decodes everything without it
    simplejpeg = None


def decode_jpeg_fast(
    data: object,
    size: int,
    max_pixels: int | None,
    formats: Collection[str] | None = SAFE_FORMATS,
    layout: JpegLayout | None = None,
) -> np.ndarray | None:
    """JPEG bytes -> uint8 (size, size, 3) through simplejpeg, or None (decided before any
    decoding) for Pillow's path; ImageDecodeError when simplejpeg, once chosen, fails.

    Also None where Pillow's path does more than decode: JPEG outside the allowlist (Pillow's
    path refuses it) and JPEG carrying EXIF or XMP orientation (it must be applied).
    `layout`: jpeg_layout(data), when the caller has it already."""
    if simplejpeg is None or not isinstance(data, bytes | bytearray) or data[:3] != JPEG_MAGIC:
        return None
    if formats is not None and "JPEG" not in {f.upper() for f in formats}:
        return None
    layout = layout if layout is not None else jpeg_layout(data)
    if layout.oriented or not layout.complete or layout.scans > MAX_JPEG_SCANS:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # an unreadable header: Pillow says why
        return None
    if colorspace not in ("YCbCr", "Gray"):  # CMYK/YCCK: Pillow inverts Adobe's CMYK
        return None
    limits = [n for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n is not None]
    if limits and width * height > min(limits):
        return None  # Pillow's path refuses it with the limit's own message
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
    except ValueError as e:  # libjpeg's fatal errors (warnings only go to Pillow's way too)
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None
    if pixels.shape[:2] == (size, size):
        return pixels
    return fit_image(Image.fromarray(pixels), size)


# --------------------------------------------------------------------------- cost sniffing


def looks_allowed(data: bytes, formats: Collection[str] | None) -> bool:
    """Whether the first bytes pass the header check of a format in `formats` (every format
    when None): Pillow's own `accept` functions on 64 bytes, microseconds. False for a format
    outside the allowlist and for bytes of no image format at all, which decoding refuses at
    once (415, 400)."""
    allowed = None if formats is None else {f.upper() for f in formats}
    return any(allowed is None or name in allowed for name in _accepting(data[:64]))


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SNIFF_BYTES = 65536  # where the sniff looks for a JPEG's frame header, at most
SNIFF_STEPS = 64  # segments (and fill bytes) it steps over, at most: real headers hold a dozen
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
# A progressive JPEG may take up to MAX_JPEG_SCANS passes over its coefficients (a sequential
# one refuses a second scan of a component): 100 scans of a 256² image cost 4-24 ms to
# decode, about what one pass over a 1024² baseline image costs (18 ms, 2-core AMD EPYC).
PROGRESSIVE_PASSES = 16


def decode_cost(data: bytes) -> int | None:
    """What decoding `data` will cost, in pixels passed over, as its header declares it: a
    PNG's IHDR width x height, a JPEG's frame header's (its first SOF, within the first
    SNIFF_BYTES and SNIFF_STEPS segments), times PROGRESSIVE_PASSES for a progressive JPEG;
    None for other formats and headers not found.

    A guess from a few bytes in pure Python, without Pillow (at most SNIFF_STEPS steps
    whatever the file: it runs on the service's event loop). The service sends images it
    can tell are cheap to the decoders kept for them (service/decode_pool.py). It is never a
    check: the decoder reads the header again and enforces every limit itself."""
    if data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    if data[:3] != JPEG_MAGIC:
        return None
    pos, end = 2, min(len(data), SNIFF_BYTES)
    for _ in range(SNIFF_STEPS):
        if pos + 9 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
        elif marker in _STANDALONE:
            pos += 2
        elif marker in _SOF:  # FFCn, length, precision, height, width
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            pixels = height * int.from_bytes(data[pos + 7 : pos + 9], "big")
            return pixels * (PROGRESSIVE_PASSES if marker in _PROGRESSIVE else 1)
        elif marker == 0xDA:  # a scan before any frame header: not a JPEG to trust
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None
