"""Decoding one image into the uint8 pixels every part of center-embed agrees on.

Needs numpy and Pillow only (no torch): training, export calibration, the HTTP service
and the batch scorer all decode through `decode_image`, so they can never disagree.

Resize policy: the image is converted to RGB, its shorter side is resized to the model's
input size with Pillow's bilinear filter (antialiased when shrinking), and the centre is
cropped to a square. An image already at the input size is passed through untouched.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode (or decoding failed part-way)."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed."""


def image_extensions() -> set[str]:
    """File extensions Pillow can open (lower case, with the dot)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB, shorter side resized to `size`, centre-cropped: uint8 (size, size, 3)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes | Path | str, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode bytes or a file into uint8 (size, size, 3) RGB, raising ImageDecodeError.

    `max_pixels` rejects images larger than that before decoding them fully; Pillow's own
    decompression-bomb limit is enforced either way (above it, not only twice above it).
    """
    fast = decode_jpeg_fast(data, size, max_pixels)
    if fast is not None:
        return fast
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        with Image.open(source) as image:
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise ImageTooLargeError(
                    f"image is {image.width}x{image.height} pixels, "
                    f"more than the limit of {max_pixels}"
                )
            # Pillow raises above twice its limit and only warns above it; refuse both here,
            # without a process-wide warnings filter (decoding runs in many threads).
            if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
                raise ImageTooLargeError(
                    f"image rejected as a decompression bomb: {pixels} pixels exceeds "
                    f"Pillow's limit of {Image.MAX_IMAGE_PIXELS}"
                )
            image.load()
            return fit_image(image, size)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image format Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Truncated or corrupt data surfaces as OSError ("image file is truncated") etc.
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None


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


def decode_jpeg_fast(data: object, size: int, max_pixels: int | None) -> np.ndarray | None:
    """JPEG bytes -> uint8 (size, size, 3) through simplejpeg, or None to fall back to Pillow."""
    if simplejpeg is None or not isinstance(data, bytes | bytearray) or data[:3] != JPEG_MAGIC:
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
