"""Far-OOD image sets any machine can build from the known test images: numpy and Pillow only.

None of them is a class of the training data; each probes a different failure of the unknown
score (docs: quality page). `shifted_sets` keep their class and are reported beside them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def far_ood_sets(known: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """name -> uint8 (n, H, W, 3) images; `known` (N, H, W, 3) are the known test images
    that the transformed sets start from."""
    rng = np.random.default_rng(seed)
    h, w = known.shape[1:3]
    picks = known[rng.choice(len(known), size=n, replace=len(known) < n)]
    builders: dict[str, Callable[[], np.ndarray]] = {
        "uniform_noise": lambda: rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "gaussian_noise": lambda: _clip(rng.normal(128, 64, (n, h, w, 3))),
        "constant_colour": lambda: np.broadcast_to(
            rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8), (n, h, w, 3)
        ).copy(),
        "blurred": lambda: _blur(picks, factor=8),
        "inverted": lambda: 255 - picks,
        "glyphs": lambda: _glyphs(n, h, w, rng),
        "shapes": lambda: _shapes(n, h, w, rng),
    }
    return {name: build() for name, build in builders.items()}


def shifted_sets(known: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Known images under a covariate shift that keeps their class (a grayscale cat is
    still a cat): reported beside the far-OOD sets, not counted as unknowns to catch."""
    rng = np.random.default_rng(seed + 1)
    picks = known[rng.choice(len(known), size=n, replace=len(known) < n)]
    gray = picks.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return {"grayscale": np.repeat(_clip(gray)[..., None], 3, axis=3)}


def _clip(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _blur(images: np.ndarray, factor: int) -> np.ndarray:
    """Average factor x factor blocks, then repeat them back: only the coarsest shapes stay."""
    n, h, w, c = images.shape
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))
    return _clip(blocks.repeat(factor, 1).repeat(factor, 2))


def _glyphs(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Grayscale renders of one digit or letter each, random size, place and shade, on a
    dark background: a character-recognition domain (like MNIST) built from Pillow's font."""
    from PIL import Image, ImageDraw, ImageFont

    alphabet = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    out = np.empty((n, h, w, 3), np.uint8)
    fonts = {size: ImageFont.load_default(size=size) for size in range(h // 2, h + 1, 2)}
    for i in range(n):
        image = Image.new("L", (w, h), int(rng.integers(0, 60)))
        size = int(rng.choice(list(fonts)))
        x, y = (int(v) for v in rng.integers(-size // 4, max(1, w - size // 2), 2))
        ImageDraw.Draw(image).text(
            (x, y), str(rng.choice(list(alphabet))), fill=int(rng.integers(160, 256)),
            font=fonts[size],
        )  # fmt: skip
        out[i] = np.asarray(image)[..., None]
    return out


def _shapes(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One to four flat-coloured ellipses, rectangles or triangles on a flat background."""
    from PIL import Image, ImageDraw

    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = (int(v) for v in rng.integers(-4, w - 4, 2))
            x1, y1 = x0 + int(rng.integers(6, w)), y0 + int(rng.integers(6, h))
            shape = int(rng.integers(3))
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        out[i] = np.asarray(image)
    return out
