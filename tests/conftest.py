"""Shared fixtures: tiny datasets built on the spot, and a tiny trained checkpoint.

The tiny image folder has three classes whose images differ in colour and texture, so a
network learns them in a few steps; every test that trains uses it (seconds, not minutes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_CLASSES = ["red", "green", "blue"]


def make_tiny_images(n: int, label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8 images: class `label` is bright in channel `label`."""
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    images[..., label] += rng.integers(120, 165, (n, 1, 1), dtype=np.uint8)
    # A class-specific stripe pattern as a second cue.
    images[:, :: label + 2, :, :] //= 2
    return images


def write_image_folder(
    root: Path, per_class: dict[str, int], classes: list[str] = TINY_CLASSES, seed: int = 0
) -> Path:
    """root/{train,test}/<class>/NNNN.png with per_class[split] images each."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(make_tiny_images(n, label, rng)):
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test decodes into its own cache, never the user's."""
    monkeypatch.setenv("CENTER_EMBED_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class image folder: 64 train and 16 test images per class."""
    return write_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 64, "test": 16})


def tiny_config(data: Path, **overrides: str):
    from center_embed.config import load_config

    sets = [f"data.path={data}", "data.val_size=48", "train.epochs=3", "train.batch_size=32"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config("tiny", None, sets)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a tiny model trained for a few seconds on `tiny_folder`."""
    import os

    from center_embed.train import train

    os.environ.setdefault("CENTER_EMBED_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(tiny_folder), out, log=lambda _: None)
    return out / "best.pt"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with a reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
