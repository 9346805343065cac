"""Readers (image folder, CIFAR archive and folder), the cache, splits and the batch loader."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from center_embed.data import (
    Split,
    channel_stats,
    load_dataset,
    select_classes,
    split_validation,
)
from center_embed.errors import UserError
from center_embed.training.loader import BatchLoader
from tests.helpers import write_cifar, write_image_folder


@pytest.mark.parametrize("as_archive", [True, False])
def test_cifar_reader_matches_the_pickled_pixels(tmp_path, as_archive):
    path, batches = write_cifar(tmp_path, as_archive)
    ds = load_dataset(path, 32)
    assert ds.class_names == [f"class{i}" for i in range(10)]
    assert ds.train.images.shape == (30, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)
    first = batches["data_batch_1"]
    # CIFAR stores each image as 1024 red, then green, then blue values, row-major.
    expected = first[b"data"][2].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(ds.train.images[2], expected)
    assert ds.train.labels[:6].tolist() == first[b"labels"]
    assert ds.test.labels.tolist() == batches["test_batch"][b"labels"]


def test_truncated_archive_is_named(tmp_path):
    path, _ = write_cifar(tmp_path, as_archive=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_dataset(path, 32)


def test_archive_with_a_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"label_names": Evil()}))
    with pytest.raises(UserError, match="forbidden global"):
        load_dataset(tmp_path, 32)


def test_image_folder_reads_any_pillow_format_and_resizes(tmp_path):
    root = write_image_folder(tmp_path / "ds", {"train": 3, "test": 2})
    # A JPEG of another size and a grey PNG: both end up 32x32 RGB.
    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / "train" / "red" / "big.jpg")
    Image.new("L", (32, 32), 128).save(root / "train" / "green" / "grey.png")
    (root / "train" / "blue" / "notes.txt").write_text("not an image, and ignored")
    ds = load_dataset(root, 32)
    assert ds.class_names == ["blue", "green", "red"]  # sorted folder names
    assert ds.train.images.shape == (11, 32, 32, 3)
    assert ds.test.images.shape == (6, 32, 32, 3)
    assert np.bincount(ds.train.labels).tolist() == [3, 4, 4]
    red = ds.train.images[ds.train.labels == 2]
    assert any(abs(int(img[..., 0].mean()) - 200) <= 2 for img in red)


def test_unreadable_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "ds", {"train": 2, "test": 1})
    bad = root / "train" / "green" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(root, 32, on_bad_image="fail")  # the default, skip, lists it instead


def test_folder_without_images(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="has no images"):
        load_dataset(tmp_path, 32)


def test_class_folders_must_match(tmp_path):
    root = write_image_folder(tmp_path / "ds", {"train": 1, "test": 1})
    (root / "test" / "red").rename(root / "test" / "crimson")
    with pytest.raises(UserError, match=r"only in train \['red'\], only in test \['crimson'\]"):
        load_dataset(root, 32)


def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(UserError, match="dataset not found"):
        load_dataset(tmp_path / "nope", 32)
    with pytest.raises(UserError, match="neither an image folder"):
        load_dataset(tmp_path, 32)


def test_second_load_comes_from_the_cache(tmp_path):
    root = write_image_folder(tmp_path / "ds", {"train": 20, "test": 5})
    first = load_dataset(root, 32)
    start = time.perf_counter()
    second = load_dataset(root, 32)
    assert time.perf_counter() - start < 0.5
    assert isinstance(second.train.images, np.memmap)
    assert np.array_equal(first.train.images, second.train.images)
    # Adding an image changes the folder's fingerprint: the cache is rebuilt.
    Image.new("RGB", (32, 32)).save(root / "train" / "red" / "extra.png")
    assert len(load_dataset(root, 32).train) == len(first.train) + 1


def test_a_cache_another_process_renamed_first_wins_silently(tmp_path, monkeypatch):
    """Two processes decode the same dataset at once: the second rename loses, quietly, and
    leaves no temporary folder behind."""
    from center_embed import data

    root = write_image_folder(tmp_path / "ds", {"train": 2, "test": 1})
    cache_root = tmp_path / "cache"
    real_write = data._write_cache

    def another_process_first(cache: Path, dataset) -> None:
        cache.mkdir(parents=True)
        (cache / "meta.json").write_text("theirs")
        real_write(cache, dataset)

    monkeypatch.setattr(data, "_write_cache", another_process_first)
    ours = load_dataset(root, 32, cache_root)
    assert len(ours.train) == 6
    (cache,) = cache_root.iterdir()  # no temporary folder left beside it
    assert (cache / "meta.json").read_text() == "theirs"


def test_validation_split_is_seeded_and_disjoint():
    split = Split(np.zeros((100, 4, 4, 3), np.uint8), np.arange(100))
    train_a, val_a = split_validation(split, 10, seed=1)
    train_b, val_b = split_validation(split, 10, seed=1)
    _, val_c = split_validation(split, 10, seed=2)
    assert val_a.labels.tolist() == val_b.labels.tolist() != val_c.labels.tolist()
    assert len(train_a) == 90 and not set(train_a.labels) & set(val_a.labels)
    with pytest.raises(UserError, match="val_size"):
        split_validation(split, 100, seed=0)


def test_select_classes_relabels_in_given_order(tmp_path):
    ds = load_dataset(write_image_folder(tmp_path / "ds", {"train": 2, "test": 1}), 32)
    sub = select_classes(ds, ["red", "blue"])
    assert sub.class_names == ["red", "blue"]
    assert sorted(set(sub.train.labels.tolist())) == [0, 1] and len(sub.train) == 4
    with pytest.raises(UserError, match="unknown classes"):
        select_classes(ds, ["purple"])


def test_batch_loader_crop_and_flip_match_reference():
    """Each augmented image equals reflect-pad + crop (+ mirror) of its source image."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(16)
    loader = BatchLoader(images, labels, 8, [0.0] * 3, [1 / 255] * 3, flip=True, translate=2)
    batches = list(loader.epoch(0))
    assert len(batches) == 2
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(16))  # a permutation of the data
    for x, y in batches:
        for xi, yi in zip(x, y, strict=True):
            src = F.pad(images[yi].permute(2, 0, 1).float()[None], (2, 2, 2, 2), mode="reflect")[0]
            views = [
                src[:, r : r + 8, c : c + 8].flip(-1) if f else src[:, r : r + 8, c : c + 8]
                for r in range(5)
                for c in range(5)
                for f in (False, True)
            ]
            assert any(torch.equal(xi, v) for v in views)
    # The same epoch replays exactly; another epoch differs.
    again = list(loader.epoch(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(list(loader.epoch(1))[0][1], batches[0][1])


def test_batch_loader_shards_the_global_batch():
    images = torch.randint(0, 256, (12, 4, 4, 3), dtype=torch.uint8)
    labels = torch.arange(12)
    kw = dict(mean=[0.0] * 3, std=[1.0] * 3, flip=True, translate=1, seed=3)
    whole = list(BatchLoader(images, labels, 6, **kw).epoch(2))
    parts = [
        list(BatchLoader(images, labels, 6, rank=r, world_size=2, **kw).epoch(2)) for r in (0, 1)
    ]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][step][0], parts[1][step][0]]), x)
        assert torch.equal(torch.cat([parts[0][step][1], parts[1][step][1]]), y)


@pytest.mark.gpu
def test_batch_loader_draws_the_same_batches_on_cuda():
    """The random choices are drawn on the CPU: a GPU run sees the CPU run's batches."""
    images = torch.randint(0, 256, (40, 8, 8, 3), dtype=torch.uint8)
    labels = torch.arange(40)
    kw = dict(mean=[0.5] * 3, std=[0.25] * 3, flip=True, translate=2, seed=1)
    on_cpu = list(BatchLoader(images, labels, 8, **kw).epoch(3))
    on_gpu = list(BatchLoader(images.cuda(), labels.cuda(), 8, **kw).epoch(3))
    for (x, y), (xg, yg) in zip(on_cpu, on_gpu, strict=True):
        assert torch.equal(y, yg.cpu()) and torch.equal(x, xg.cpu())


def test_channel_stats_sample_every_class():
    """Folders are read class by class: the statistics must not come from the first only."""
    images = np.zeros((30, 2, 2, 3), np.uint8)
    images[10:20] = 255  # the second of three classes is white
    mean, std = channel_stats(images, max_images=7)
    assert mean == pytest.approx([1 / 3] * 3, abs=0.1) and min(std) > 0.3


def test_load_for_classes_relabels_in_the_models_order_and_names_what_is_missing(tmp_path):
    from center_embed.data import load_dataset, load_for_classes

    root = write_image_folder(tmp_path / "d", {"train": 2, "test": 1}, ["ant", "bee", "cat"])
    size = 16
    full = load_dataset(root, size, tmp_path / "cache")
    same = load_for_classes(root, ["ant", "bee", "cat"], size, tmp_path / "cache")
    assert same.class_names == full.class_names
    np.testing.assert_array_equal(same.train.labels, full.train.labels)
    sub = load_for_classes(root, ["cat", "ant"], size, tmp_path / "cache")
    assert sub.class_names == ["cat", "ant"] and len(sub.train) == 4
    cat_images = full.train.images[full.train.labels == 2]
    np.testing.assert_array_equal(sub.train.images[sub.train.labels == 0], cat_images)
    with pytest.raises(UserError, match=r"lacks the model's classes \['dog'\]"):
        load_for_classes(root, ["cat", "dog"], size, tmp_path / "cache")
