"""Decoding a batch for scoring, one error per image that fails: both engines' one path.

An image that cannot be read or decoded gets an error string (the messages below, or
ImageDecodeError's own) and no pixels; the batch goes on. The local engine (local.py) and
the Ray stages (ray/stages.py) differ only in how one image is read (`decode_one`).

Imports numpy and center_embed.imageio (Pillow) only: never torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from center_embed.imageio import ImageDecodeError

T = TypeVar("T")


def decode_batch(
    sources: Sequence[T], size: int, decode_one: Callable[[T], np.ndarray]
) -> tuple[np.ndarray, list[str | None]]:
    """(uint8 (k, size, size, 3) of the k sources that decoded, in order; error or None
    per source).

    `decode_one` turns one source (an item, a path, bytes) into uint8 (size, size, 3),
    raising ImageDecodeError for bad image data and OSError where a file cannot be read.
    """
    images = np.empty((len(sources), size, size, 3), np.uint8)
    errors: list[str | None] = [None] * len(sources)
    k = 0
    for i, source in enumerate(sources):
        try:
            images[k] = decode_one(source)
            k += 1
        except ImageDecodeError as e:
            errors[i] = str(e)
        except OSError as e:
            errors[i] = f"cannot read file: {e.strerror or e}"
    return images[:k], errors


def read_image_file(path: str) -> bytes:
    """A local file's bytes; an empty file is an ImageDecodeError of its own (the local
    engine's message)."""
    with open(path, "rb", buffering=0) as f:  # cheaper than Path.read_bytes
        data = f.read()
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return data
