"""Shared fixtures: a tiny dataset built on the spot, a tiny trained checkpoint and the
ONNX model exported from it, each built once per session.

The tiny image folder has three classes whose images differ in colour and texture, so a
network learns them in a few steps; every test that trains uses it (seconds, not minutes).
Plain helper functions live in tests/helpers.py; this file holds fixtures and hooks only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import format_1_copy, tiny_config, write_image_folder

# serve and score run onnxruntime in the tests, the reference every answer is compared
# with, session fixtures included; their default (auto) is tested on its own
# (tests/core/test_runtime.py).
os.environ.setdefault("CENTER_EMBED_RUNTIME", "onnxruntime")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test decodes into its own cache, never the user's."""
    monkeypatch.setenv("CENTER_EMBED_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class image folder: 64 train and 16 test images per class."""
    return write_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 64, "test": 16})


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a tiny model trained for a few seconds on `tiny_folder`."""
    import os

    from center_embed.training.train import train

    os.environ.setdefault("CENTER_EMBED_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(tiny_folder), out, log=lambda _: None)
    return out / "best.pt"


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported (and verified) once by export_checkpoint: "a model" for
    the export, score, report and service tests. Read it; never write to it."""
    from center_embed.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_plain_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file of format 1 (four outputs, squared distances, no atypicality, no
    unknown_scores: what files exported before 2026-12-01 hold), made from the tiny
    checkpoint: what older models look like to every reader."""
    from center_embed.export.atypicality import AtypicalityOptions
    from center_embed.export.onnx_export import export_checkpoint

    folder = tmp_path_factory.mktemp("onnx-plain")
    source = export_checkpoint(tiny_checkpoint, folder / "v2.onnx", unknown_score="min_distance",
                               atypicality=AtypicalityOptions(enabled=False))  # fmt: skip
    return format_1_copy(source, folder / "plain.onnx")


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
