"""Decoding one image into the uint8 pixels every part of center-embed agrees on.

Needs numpy and Pillow only (no torch): training, export calibration, the HTTP service
and the batch scorer all decode through `decode_image`, so they can never disagree.

Resize policy: EXIF orientation is applied, the image is converted to RGB (16-bit, 32-bit
and float pixels are scaled to 8 bits, not clipped), its shorter side is resized to the
model's input size with Pillow's bilinear filter (antialiased when shrinking), and the
centre is cropped to a square. The resize reads only the source box of that square, so the
output is (size, size) whatever the aspect ratio: a 1×1,000,000 image never becomes a
32×32,000,000 intermediate. An image already at the input size is passed through untouched.

Only an allowlist of formats is decoded (`SAFE_FORMATS`): Pillow can open many more, some
through external programs (EPS through Ghostscript) or with containers that decode an inner
image inside `Image.open` (ICO), which untrusted bytes must never reach.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats decoded by default, by Pillow's format names: common, pure-decoder formats.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

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
    if image.mode.startswith("I;16"):
        gray = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode in ("I", "F"):
        gray = _scale_to_8bit(np.asarray(image, dtype=np.float64), fractions=image.mode == "F")
    else:
        return image.convert("RGB")
    return Image.fromarray(np.rint(gray).clip(0, 255).astype(np.uint8), "L").convert("RGB")


def _scale_to_8bit(values: np.ndarray, fractions: bool) -> np.ndarray:
    """32-bit integer or float grey levels to 0..255, by the range the values fit in: float
    values within [0, 1] are fractions of white; otherwise 8-, 16- or 32-bit ranges."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    top = float(values.max(initial=0.0))
    if fractions and top <= 1.0:
        return values * 255.0
    if top <= 255:
        return values
    if top <= 65535:
        return values / 257.0
    return values / (2**32 - 1) * 255.0


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
    fast = decode_jpeg_fast(data, size, max_pixels, formats)
    if fast is not None:
        return fast
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    with _decode_errors(), _open(source, formats) as image:
        check_size(image.width, image.height, max_pixels)
        image.load()
        return fit_image(ImageOps.exif_transpose(image), size)


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
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            return name
    return None


# --------------------------------------------------------------------------- fast JPEG
#
# simplejpeg (libjpeg-turbo, bundled in its wheel; it releases the GIL while decoding) gives
# the same pixels as Pillow's JPEG decoder (both use libjpeg-turbo's default accurate DCT and
# fancy upsampling) at a fifth to a third of the cost on 32x32 JPEGs, where Pillow's per-image
# overhead dominates (README, "Runtimes", for the measurement and the PyTurboJPEG
# comparison). It handles only what it surely decodes exactly: JPEG bytes within the pixel
# limits; anything else (other formats, CMYK, corrupt or truncated data, an image over a
# limit) returns None and goes through Pillow, which raises the one canonical error.

JPEG_MAGIC = b"\xff\xd8\xff"

try:
    import simplejpeg
except ImportError:  # an optional speed-up: Pillow decodes everything without it
    simplejpeg = None


def decode_jpeg_fast(
    data: object,
    size: int,
    max_pixels: int | None,
    formats: Collection[str] | None = SAFE_FORMATS,
) -> np.ndarray | None:
    """JPEG bytes -> uint8 (size, size, 3) through simplejpeg, or None to fall back to Pillow.

    Also None where Pillow's path does more than decode: JPEG outside the allowlist (Pillow's
    path refuses it) and JPEG carrying EXIF (its orientation must be applied)."""
    if simplejpeg is None or not isinstance(data, bytes | bytearray) or data[:3] != JPEG_MAGIC:
        return None
    if formats is not None and "JPEG" not in {f.upper() for f in formats}:
        return None
    if b"Exif\x00\x00" in data[:65536]:  # an APP1 EXIF segment sits near the start
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):  # CMYK/YCCK: Pillow inverts Adobe's CMYK
            return None
        limits = [n for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n is not None]
        if limits and width * height > min(limits):
            return None  # Pillow's path refuses it with the limit's own message
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: warnings raise
    except ValueError:  # not decodable exactly (CMYK, corrupt, truncated): Pillow decides
        return None
    if pixels.shape[:2] == (size, size):
        return pixels
    return fit_image(Image.fromarray(pixels), size)
