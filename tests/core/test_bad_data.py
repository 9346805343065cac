"""Training data a user trips over: a corrupt image (skip and report, or fail), an empty
class folder, a single class."""

from __future__ import annotations

import pytest

from center_embed.data import load_dataset
from center_embed.errors import UserError
from tests.helpers import tiny_config, write_image_folder


@pytest.fixture
def folder_with_corrupt_images(tmp_path):
    root = write_image_folder(tmp_path / "d", {"train": 4, "test": 2})
    (root / "train" / "red" / "bad.png").write_bytes(b"not a png at all")
    (root / "test" / "blue" / "empty.jpg").write_bytes(b"")
    return root


def test_corrupt_images_are_skipped_and_listed_by_default(folder_with_corrupt_images, tmp_path):
    dataset = load_dataset(folder_with_corrupt_images, 32, tmp_path / "cache")
    assert len(dataset.train) == 12 and len(dataset.test) == 6
    assert sorted(p.rsplit("/", 1)[1] for p in dataset.skipped) == ["bad.png", "empty.jpg"]
    cached = load_dataset(folder_with_corrupt_images, 32, tmp_path / "cache")  # from the cache
    assert cached.skipped == dataset.skipped and len(cached.train) == 12


def test_on_bad_image_fail_names_the_files(folder_with_corrupt_images, tmp_path):
    with pytest.raises(UserError, match=r"1 unreadable image: .*bad\.png; set data.on_bad"):
        load_dataset(folder_with_corrupt_images, 32, tmp_path / "cache", on_bad_image="fail")


def test_training_says_what_it_skipped(folder_with_corrupt_images, tmp_path, monkeypatch):
    from center_embed.training.train import train

    monkeypatch.setenv("CENTER_EMBED_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    cfg = tiny_config(
        folder_with_corrupt_images, train__epochs="1", data__val_size="3", train__batch_size="4"
    )
    train(cfg, tmp_path / "run", log=lines.append)
    (said,) = [line for line in lines if line.startswith("skipped ")]
    assert said.startswith("skipped 2 unreadable images: ") and "bad.png" in said


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "d", {"train": 2, "test": 2})
    (root / "train" / "purple").mkdir()
    (root / "test" / "purple").mkdir()
    with pytest.raises(UserError, match=r"class folder .*purple has no images"):
        load_dataset(root, 32, tmp_path / "cache")


def test_a_single_class_is_an_error_before_training(tmp_path, monkeypatch):
    from center_embed.training.train import train

    monkeypatch.setenv("CENTER_EMBED_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "d", {"train": 2, "test": 2}, ["only"])
    with pytest.raises(UserError, match="needs at least 2"):
        train(tiny_config(root), tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run" / "last.pt").exists()
