"""--download against a local file:// archive in the official format: verified, unpacked,
fetched once; a wrong checksum, a missing URL, a cut connection or Ctrl-C leave nothing."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from center_embed.cli import main
from center_embed.data import CIFAR_ARCHIVE, CIFAR_FOLDER, load_dataset
from center_embed.errors import UserError
from center_embed.training import download
from center_embed.training.download import CIFAR_FILES, download_cifar10

CIFAR_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
PER_BATCH = 40  # images per batch file: 200 train and 40 test images


def make_cifar_archive(path: Path, per_batch: int = PER_BATCH, skip: str = "") -> Path:
    """A tar.gz laid out as the official one: cifar-10-batches-py/ holding pickled dicts."""
    rng = np.random.default_rng(0)

    def batch(name: str) -> bytes:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, :1024] //= 1 + np.asarray(labels, np.uint8)[:, None]  # a class cue in red
        return pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data})

    blobs = {name: batch(name) for name in CIFAR_FILES if name != "batches.meta"}
    blobs["batches.meta"] = pickle.dumps(
        {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            if name == skip:
                continue
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_cifar_archive(tmp_path_factory.mktemp("server") / CIFAR_ARCHIVE)


def test_download_verifies_unpacks_and_fetches_once(archive, tmp_path):
    root, logged = tmp_path / "cifar10", []
    folder = download_cifar10(root, archive.as_uri(), md5(archive), log=logged.append)
    assert folder == root / CIFAR_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == sorted(CIFAR_FILES)
    assert (root / CIFAR_ARCHIVE).read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in root.iterdir()) == sorted([CIFAR_ARCHIVE, CIFAR_FOLDER])
    assert f"verified md5 {md5(archive)}; saved {root / CIFAR_ARCHIVE}" in logged
    dataset = load_dataset(root)
    assert dataset.class_names == CIFAR_NAMES
    assert len(dataset.train) == 5 * PER_BATCH and len(dataset.test) == PER_BATCH
    assert dataset.train.images.shape[1:] == (32, 32, 3)

    # Once: a second call does not touch the network (this URL would fail).
    logged.clear()
    assert download_cifar10(root, "file:///nonexistent/x.tar.gz", log=logged.append) == folder
    assert logged == []
    # The kept archive rebuilds a deleted folder without fetching.
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    download_cifar10(root, "file:///nonexistent/x.tar.gz", md5(archive), log=logged.append)
    assert logged == [f"unpacked {root / CIFAR_ARCHIVE} into {folder}"]
    assert len(load_dataset(root).train) == 5 * PER_BATCH


def test_download_to_an_archive_path(archive, tmp_path):
    target = tmp_path / "data" / CIFAR_ARCHIVE
    assert download_cifar10(target, archive.as_uri(), md5(archive), log=print) == target
    assert md5(target) == md5(archive) and sorted(target.parent.iterdir()) == [target]


def test_wrong_checksum_keeps_nothing(archive, tmp_path):
    root = tmp_path / "cifar10"
    with pytest.raises(UserError, match=f"has md5 {md5(archive)}, expected 0{{32}}"):
        download_cifar10(root, archive.as_uri(), "0" * 32, log=print)
    assert list(root.iterdir()) == []


def test_missing_url_keeps_nothing(tmp_path):
    root = tmp_path / "cifar10"
    url = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(UserError, match=r"download of .*nowhere.tar.gz failed .*nothing was kept"):
        download_cifar10(root, url, log=print)
    assert list(root.iterdir()) == []


class CutResponse:
    """A response that sends one chunk, then fails as a dropped connection (or Ctrl-C) does."""

    def __init__(self, data: bytes, error: BaseException | None, length: int) -> None:
        self.data, self.error, self.sent = data, error, False
        self.headers = {"Content-Length": str(length)}

    def read(self, n: int) -> bytes:
        if self.sent:
            if self.error is not None:
                raise self.error
            return b""
        self.sent = True
        return self.data[: len(self.data) // 2]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), UserError, "Connection reset"),
        (None, UserError, r"ended early: \d+ of \d+ bytes"),
        (KeyboardInterrupt(), KeyboardInterrupt, None),
    ],
)
def test_interrupted_download_keeps_nothing(
    archive, tmp_path, monkeypatch, error, expected, message
):
    data = archive.read_bytes()
    response = CutResponse(data, error, len(data))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: response)
    root = tmp_path / "cifar10"
    with pytest.raises(expected, match=message):
        download_cifar10(root, "https://example.invalid/c.tar.gz", md5(archive), log=print)
    assert response.sent and list(root.iterdir()) == []


def test_bad_archives_and_bad_targets(archive, tmp_path):
    root = tmp_path / "damaged"
    root.mkdir()
    (root / CIFAR_ARCHIVE).write_bytes(b"half an archive")
    with pytest.raises(UserError, match="exists but its md5 is .* Delete it"):
        download_cifar10(root, archive.as_uri(), md5(archive), log=print)
    assert (root / CIFAR_ARCHIVE).read_bytes() == b"half an archive"  # the user's file stays

    # Right checksum, wrong contents (a mirror that serves something else).
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not gzip at all")
    root = tmp_path / "junk"
    with pytest.raises(UserError, match="truncated or corrupt"):
        download_cifar10(root, junk.as_uri(), md5(junk), log=print)
    assert sorted(p.name for p in root.iterdir()) == [CIFAR_ARCHIVE]  # verified, kept; no dir

    partial = make_cifar_archive(tmp_path / "partial" / CIFAR_ARCHIVE, 2, skip="test_batch")
    root = tmp_path / "partial-root"
    with pytest.raises(UserError, match="lacks CIFAR-10 files: test_batch"):
        download_cifar10(root, partial.as_uri(), md5(partial), log=print)
    assert sorted(p.name for p in root.iterdir()) == [CIFAR_ARCHIVE]

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="needs a folder"):
        download_cifar10(tmp_path / "file.txt", archive.as_uri(), md5(archive), log=print)

    root = tmp_path / "incomplete"
    (root / CIFAR_FOLDER).mkdir(parents=True)
    (root / CIFAR_FOLDER / "data_batch_1").write_bytes(b"")
    with pytest.raises(UserError, match=f"{CIFAR_FOLDER} exists but lacks"):
        download_cifar10(root, archive.as_uri(), md5(archive), log=print)
    assert sorted(p.name for p in root.iterdir()) == [CIFAR_FOLDER]  # nothing fetched


def test_an_image_folder_needs_no_download(tiny_folder, archive):
    logged = []
    result = download_cifar10(tiny_folder, archive.as_uri(), md5(archive), log=logged.append)
    assert result == tiny_folder and logged == [
        f"{tiny_folder} holds an image folder; nothing to download"
    ]
    assert not (tiny_folder / CIFAR_ARCHIVE).exists()


def test_train_download_with_a_class_subset_from_the_command_line(
    archive, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(download, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(download, "CIFAR10_MD5", md5(archive))
    root, out = tmp_path / "cifar10", tmp_path / "run"
    args = [
        "train", "--preset", "tiny", "--data", str(root), "--download", "--out", str(out),
        "--classes", "ship,airplane", "--set", "train.batch_size=16", "--set", "train.epochs=1",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"downloading {archive.as_uri()}" in printed
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["class_names"] == ["ship", "airplane"]
    assert ckpt["config"]["data"]["classes"] == ["ship", "airplane"]
    assert ckpt["data_source"] == str(root / CIFAR_FOLDER)
    assert ckpt["center_loss"]["centers"].shape == (2, 16)
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["test_images"] == 2 * PER_BATCH // 10  # ships and airplanes only
