"""Datasets: read once, cache as uint8 arrays, split. numpy only (no torch).

Two on-disk formats are read:
  * an image-folder tree: `train/<class>/*` and `test/<class>/*`, any format Pillow reads
    (`test/` is optional: without it the test split is empty, and the tools that measure
    on it say so through `require_test_split`);
  * the canonical CIFAR-10 python archive: `cifar-10-python.tar.gz` or its extracted
    `cifar-10-batches-py/` folder (or a folder holding either).

Decoding 60,000 JPEGs takes a while, so the decoded arrays are cached as .npy files keyed
by the source path, its fingerprint and the image size; a second start memory-maps them.
Batching and augmentation on the training device are loader.py's job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from center_embed.errors import UserError
from center_embed.fileio import atomic_path
from center_embed.imageio import ImageDecodeError, decode_image, image_extensions

CACHE_VERSION = 1
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_BATCH = "test_batch"


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    train: Split
    test: Split
    class_names: list[str]
    source: str  # where it was read from, for provenance
    skipped: list[str] = field(default_factory=list)  # image files that did not decode


# --------------------------------------------------------------------------- reading


def load_dataset(
    path: str | Path, image_size: int = 32, cache_dir: str | Path = "", on_bad_image: str = "skip"
) -> Dataset:
    """Read an image folder or a CIFAR-10 archive, through the cache. An image file that
    does not decode is left out and listed in `skipped` (`on_bad_image="skip"`), or stops
    the load with a UserError naming the first few (`"fail"`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"dataset not found: {path}")
    path = path.resolve()  # the source a run records works from any directory
    kind, source = _detect_format(path)
    key = _cache_key(kind, source, image_size) + ("" if on_bad_image == "skip" else "-strict")
    cache = _cache_root(cache_dir) / key
    if (cache / "meta.json").exists():
        try:
            return _read_cache(cache, str(source))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    if kind == "folder":
        dataset = _read_image_folder(source, image_size, on_bad_image)
    else:
        dataset = _read_cifar(source, kind)
        if dataset.train.images.shape[1] != image_size:
            raise UserError(
                f"{source} holds {dataset.train.images.shape[1]}px images; "
                f"set data.image_size={dataset.train.images.shape[1]}"
            )
    _write_cache(cache, dataset)
    return dataset


def _detect_format(path: Path) -> tuple[str, Path]:
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "archive", path
        raise UserError(f"{path} is a file but not a .tar.gz archive of CIFAR-10")
    if (path / "data_batch_1").exists() or (path / "batches.meta").exists():
        return "batches", path
    if (path / CIFAR_FOLDER).is_dir():
        return "batches", path / CIFAR_FOLDER
    if (path / CIFAR_ARCHIVE).is_file():
        return "archive", path / CIFAR_ARCHIVE
    if (path / "train").is_dir():
        return "folder", path
    raise UserError(
        f"{path} is neither an image folder (train/<class>/*, optionally test/<class>/*) "
        f"nor a CIFAR-10 archive ({CIFAR_ARCHIVE} or {CIFAR_FOLDER}/)"
    )


def _read_image_folder(root: Path, image_size: int, on_bad_image: str = "skip") -> Dataset:
    train_classes = _class_dirs(root / "train")
    has_test = (root / "test").is_dir()
    test_classes = _class_dirs(root / "test") if has_test else train_classes
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise UserError(
            f"class folders differ between {root / 'train'} and {root / 'test'}: "
            f"only in train {only_train}, only in test {only_test}"
        )
    splits, skipped = [], []
    for split in ("train", "test") if has_test else ("train",):
        files, labels = _list_images(root / split, train_classes, require_each=split == "train")
        images, bad = _decode_files(files, image_size)
        if bad and on_bad_image == "fail":
            raise UserError(f"{describe_skipped([str(files[i]) for i in bad])}; "
                            "set data.on_bad_image=skip to leave them out")  # fmt: skip
        keep = np.setdiff1d(np.arange(len(files)), bad)
        skipped += [str(files[i]) for i in bad]
        if not len(keep):
            raise UserError(f"no readable images under {root / split}")
        splits.append(Split(images[keep], np.asarray(labels, np.int64)[keep]))
    if not has_test:  # no test/ folder: an empty test split (no test evaluation)
        splits.append(_empty_split(image_size))
    return Dataset(splits[0], splits[1], train_classes, str(root), skipped)


def _empty_split(image_size: int) -> Split:
    return Split(np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64))


def require_test_split(dataset: Dataset, needed_for: str) -> Split:
    """The dataset's test split, or a UserError saying `needed_for` needs one."""
    if not len(dataset.test):
        raise UserError(
            f"{dataset.source} has no test split (no test/<class>/ folders); {needed_for} "
            "needs one: add test/<class>/ images or pass a dataset that has them with --data"
        )
    return dataset.test


def _list_images(folder: Path, classes: list[str], require_each: bool) -> tuple[list, list]:
    """Image files under folder/<class>/ and their labels; with `require_each`, a class
    folder without images is an error (its center would never be trained)."""
    extensions = image_extensions()
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (folder / name).iterdir()
            if p.suffix.lower() in extensions and not p.name.startswith(".")
        )
        if require_each and not found:
            raise UserError(
                f"class folder {folder / name} has no images: add some or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"no images found under {folder}")
    return files, labels


def describe_skipped(paths: list[str], first: int = 5) -> str:
    """`3 unreadable images: a.png, b.png, c.png` (the first few of them)."""
    shown = ", ".join(paths[:first]) + (", ..." if len(paths) > first else "")
    noun = "image" if len(paths) == 1 else "images"
    return f"{len(paths)} unreadable {noun}: {shown}"


def _class_dirs(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"no class folders in {folder}")
    return names


def _decode_files(files: list[Path], image_size: int) -> tuple[np.ndarray, list[int]]:
    """The decoded images, and the indices of the files that did not decode (left zero)."""
    images = np.zeros((len(files), image_size, image_size, 3), np.uint8)
    bad: list[int] = []

    def work(i: int) -> None:
        try:
            images[i] = decode_image(files[i], image_size)
        except (ImageDecodeError, OSError, ValueError, EOFError, struct.error):
            # OSError: unreadable, or Pillow's "cannot identify"; struct.error: what Pillow
            # raises for some empty or truncated headers read from a path
            bad.append(i)  # list.append is atomic under the GIL

    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for _ in pool.map(work, range(len(files)), chunksize=256):
            pass
    return images, sorted(bad)


class _SafeUnpickler(pickle.Unpickler):
    """Only what CIFAR batches contain (dicts, lists, numpy arrays): no code execution."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in CIFAR batch")


def _unpickle(data: bytes, name: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"CIFAR batch {name} is corrupt: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR batch {name} is not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar(source: Path, kind: str) -> Dataset:
    wanted = [*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, "batches.meta"]
    blobs: dict[str, bytes] = {}
    if kind == "archive":
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in wanted:
                        blobs[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"archive {source} is truncated or corrupt: {e}") from None
    else:
        for name in wanted:
            if (source / name).is_file():
                blobs[name] = (source / name).read_bytes()
    missing = [n for n in wanted if n not in blobs]
    if missing:
        raise UserError(f"{source} lacks CIFAR-10 files: {', '.join(missing)}")
    meta = _unpickle(blobs["batches.meta"], "batches.meta")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]

    def split(names: list[str]) -> Split:
        images, labels = [], []
        for name in names:
            batch = _unpickle(blobs[name], name)
            try:
                data = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
                batch_labels = np.asarray(batch["labels"], np.int64)
            except (KeyError, ValueError) as e:
                raise UserError(f"CIFAR batch {name} is malformed: {e}") from None
            if len(batch_labels) != len(data):
                raise UserError(
                    f"CIFAR batch {name}: {len(data)} images, {len(batch_labels)} labels"
                )
            images.append(data.transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
            labels.append(batch_labels)
        labels_all = np.concatenate(labels)
        if labels_all.min() < 0 or labels_all.max() >= len(class_names):
            raise UserError(f"{source}: labels out of range for {len(class_names)} classes")
        return Split(np.ascontiguousarray(np.concatenate(images)), labels_all)

    return Dataset(split(CIFAR_TRAIN_BATCHES), split([CIFAR_TEST_BATCH]), class_names, str(source))


# --------------------------------------------------------------------------- cache


def _cache_root(cache_dir: str | Path) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CENTER_EMBED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "center-embed"


def _fingerprint(kind: str, source: Path) -> list:
    """Cheap change detection: sizes and mtimes of files, or of folders for an image tree.

    A folder's mtime changes whenever a file is added, removed or renamed in it, so an
    image tree is fingerprinted without a stat of each of its files.
    """
    if kind == "folder":
        parts = []
        for split in ("train", "test"):
            if not (source / split).is_dir():  # test/ is optional; adding it changes the key
                continue
            for d in sorted((source / split).iterdir()):
                if d.is_dir():
                    st = d.stat()
                    parts.append([split, d.name, st.st_mtime_ns])
        return parts
    files = [source] if kind == "archive" else sorted(p for p in source.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _cache_key(kind: str, source: Path, image_size: int) -> str:
    ident = [CACHE_VERSION, kind, str(source.resolve()), image_size, _fingerprint(kind, source)]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    return f"{source.name}-{digest}"


def _write_cache(cache: Path, dataset: Dataset) -> None:
    """Fill a temporary folder, then rename it: a crash never leaves a torn cache."""
    try:
        with atomic_path(cache, directory=True) as tmp:
            for split_name in ("train", "test"):
                split = getattr(dataset, split_name)
                np.save(tmp / f"{split_name}_images.npy", split.images)
                np.save(tmp / f"{split_name}_labels.npy", split.labels)
            meta = {
                "class_names": dataset.class_names,
                "version": CACHE_VERSION,
                "skipped": dataset.skipped,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
    except OSError:
        # Either the location is read-only, which only costs the next start its decode
        # time, or another process renamed its cache into place first (a folder cannot
        # replace a non-empty one): theirs is as good as ours, and ours is removed.
        pass


def _read_cache(cache: Path, source: str) -> Dataset:
    meta = json.loads((cache / "meta.json").read_text())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError("old cache")

    def split(name: str) -> Split:
        return Split(
            np.load(cache / f"{name}_images.npy", mmap_mode="r"),
            np.load(cache / f"{name}_labels.npy"),
        )

    return Dataset(
        split("train"), split("test"), meta["class_names"], source, meta.get("skipped", [])
    )


# --------------------------------------------------------------------------- selecting


def select_classes(dataset: Dataset, classes: list[str]) -> Dataset:
    """Keep only the named classes, relabelled 0..k-1 in the order given."""
    if not classes:
        return dataset
    unknown = [c for c in classes if c not in dataset.class_names]
    if unknown:
        raise UserError(f"unknown classes {unknown}; the dataset has {dataset.class_names}")
    if len(set(classes)) != len(classes):
        raise UserError(f"classes listed twice in {classes}")
    if len(classes) < 2:  # one class gives softmax nothing to learn
        raise UserError(f"a class subset needs at least two classes, got {classes}")
    old_to_new = np.full(len(dataset.class_names), -1, np.int64)
    for new, name in enumerate(classes):
        old_to_new[dataset.class_names.index(name)] = new

    def pick(split: Split) -> Split:
        keep = np.flatnonzero(old_to_new[split.labels] >= 0)
        return Split(split.images[keep], old_to_new[split.labels[keep]])

    return Dataset(
        pick(dataset.train), pick(dataset.test), list(classes), dataset.source, dataset.skipped
    )


def load_for_classes(
    path: str | Path, class_names: list[str], image_size: int = 32, cache_dir: str | Path = ""
) -> Dataset:
    """The dataset at `path` restricted and relabelled to a model's classes, in its order.

    Every tool that measures a trained model (eval, calibration, verify, the report) loads
    its data through here, so "this data does not fit this model" has one message.
    """
    dataset = load_dataset(path, image_size, cache_dir)
    if dataset.class_names == list(class_names):
        return dataset
    missing = [c for c in class_names if c not in dataset.class_names]
    if missing:
        raise UserError(
            f"{path} lacks the model's classes {missing} (it has {dataset.class_names}); "
            "pass the dataset the model was trained on"
        )
    return select_classes(dataset, list(class_names))


def validation_count(val_size: float, num_train: int) -> int:
    """How many training images `data.val_size` holds out: a count when >= 1, a share of
    the training images when below 1 (at least one image for a share above 0)."""
    if 0 < val_size < 1:
        return min(max(1, round(val_size * num_train)), max(num_train - 1, 0))
    if val_size != int(val_size) or val_size < 0 or val_size >= max(num_train, 1):
        raise UserError(
            f"data.val_size={val_size:g} must be a share in (0, 1) or a whole count in "
            f"[0, {num_train - 1}] (the dataset has {num_train} training images)"
        )
    return int(val_size)


def split_validation(train: Split, val_size: float, seed: int) -> tuple[Split, Split]:
    """Hold `val_size` (a count, or a share below 1) of the training images out, chosen by a
    seeded permutation."""
    count = validation_count(val_size, len(train))
    order = np.random.default_rng(seed).permutation(len(train))
    val_index, train_index = np.sort(order[:count]), np.sort(order[count:])
    return train.subset(train_index), train.subset(val_index)


def spread_sample(n: int, k: int) -> np.ndarray:
    """At most k indices spread evenly over range(n): folders are read class by class, so
    the first k images would all come from the first classes."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


def channel_stats(images: np.ndarray, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels/255, from at most `max_images` images."""
    sample = np.asarray(images[spread_sample(len(images), max_images)], np.float64) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)).clip(min=1e-3)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]
