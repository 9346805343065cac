"""What `center-embed score` reads: a folder tree, a text file of paths, or a CIFAR-10 set.

Each source enumerates its images lazily and always in the same order, so that a resumed
run can skip exactly the rows an interrupted one wrote, and memory stays flat however many
images there are. An item is named by a stable `id`: the path relative to the folder, the
line as written in the list, or `<split>/<index>` in a dataset.

What an input says about each image's class (the `true_class` column): a dataset archive
and a Parquet list's `true_class` column give it; otherwise `folder_class` takes the name of
the folder holding the image file when that names one of the model's classes, so that
`<class>/<image>` and `train|test/<class>/<image>` trees score with their ground truth.

Imports numpy, Pillow and center_embed's torch-free readers only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from center_embed.data import CIFAR_ARCHIVE, CIFAR_FOLDER, load_dataset
from center_embed.errors import UserError
from center_embed.imageio import image_extensions

CIFAR_SIZE = 32  # CIFAR-10 archives hold 32x32 images; other input sizes are resized


@dataclass
class Item:
    id: str
    path: str | None = None  # a file to decode, or
    pixels: np.ndarray | None = None  # (H, W, 3) uint8 already decoded (dataset inputs)
    true_class: str | None = None  # the ground truth, where the source knows it


class Source:
    """A sequence of images in a fixed order."""

    kind = ""

    def describe(self) -> dict[str, object]:
        """What identifies this input, for the resume manifest."""
        raise NotImplementedError

    def count(self) -> int:
        """How many items `items()` yields (a cheap pass: nothing is decoded)."""
        raise NotImplementedError

    def items(self) -> Iterator[Item]:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Files passed over without a row (not images by their extension)."""
        return 0


class FolderSource(Source):
    """Every image file under a folder, recursively, in sorted order per directory.

    Hidden files and folders are skipped, and so are links to folders (no cycles). Files
    are chosen by extension (any that Pillow registers) unless `all_files`, which tries
    every file and reports those that do not decode as failures.
    """

    kind = "folder"

    def __init__(self, root: Path, all_files: bool = False) -> None:
        self.root = Path(absolute_path(root))  # the `path` column (links kept as named)
        self.all_files = all_files
        self.extensions = image_extensions()
        self._skipped = 0

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "path": str(self.root.resolve()), "all_files": self.all_files}

    def _walk(self, folder: str, prefix: str) -> Iterator[tuple[str, str] | None]:
        """(id, path) of each wanted file; None for each file skipped by extension.

        Plain strings, not Path objects: this runs once per file. One directory's listing
        is held at a time (to sort it), so memory grows with the largest directory only.
        """
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"cannot list {folder}: {e.strerror}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, f"{prefix}{entry.name}/")
            elif _is_file_or_unreadable(entry):  # unreadable: a failed row saying why
                extension = os.path.splitext(entry.name)[1].lower()
                wanted = self.all_files or extension in self.extensions
                yield (prefix + entry.name, entry.path) if wanted else None

    def count(self) -> int:
        return sum(1 for found in self._walk(str(self.root), "") if found is not None)

    def items(self) -> Iterator[Item]:
        self._skipped = 0
        for found in self._walk(str(self.root), ""):
            if found is None:
                self._skipped += 1
            else:
                yield Item(id=found[0], path=found[1])

    @property
    def skipped(self) -> int:
        return self._skipped


def _is_file_or_unreadable(entry: os.DirEntry) -> bool:
    """A file, or a link that cannot be followed (a loop: ELOOP): the latter is listed so
    that scoring reports it as a failed row instead of aborting the whole run."""
    try:
        return entry.is_file()
    except OSError:
        return entry.is_symlink()


class ListSource(Source):
    """A text file with one image path a line; blank lines and `#` comments are ignored.

    Relative paths are taken relative to the list file's folder. Every listed path gets a
    row, so a missing file is a failure, not a silent gap.
    """

    kind = "list"

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> dict[str, object]:
        stat = self.path.stat()
        return {
            "kind": self.kind,
            "path": str(self.path.resolve()),
            "size": stat.st_size,
        }

    def _lines(self) -> Iterator[str]:
        try:
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield line
        except UnicodeDecodeError:
            raise UserError(f"{self.path} is not a UTF-8 text file of image paths") from None

    def count(self) -> int:
        return sum(1 for _ in self._lines())

    def items(self) -> Iterator[Item]:
        base = Path(absolute_path(self.path)).parent  # the `path` column is absolute
        for line in self._lines():
            yield Item(id=line, path=absolute_path(base / Path(line).expanduser()))


class DatasetSource(Source):
    """A CIFAR-10 archive or batch folder, read by center_embed.data (through its cache)."""

    kind = "dataset"

    def __init__(self, path: Path, split: str = "all") -> None:
        if split not in ("train", "test", "all"):
            raise UserError(f"--split must be train, test or all, not {split!r}")
        self.path, self.split = path, split
        self.dataset = load_dataset(path, CIFAR_SIZE)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "split": self.split}

    def _splits(self) -> list[str]:
        return ["train", "test"] if self.split == "all" else [self.split]

    def count(self) -> int:
        return sum(len(getattr(self.dataset, s)) for s in self._splits())

    def items(self) -> Iterator[Item]:
        names = self.dataset.class_names
        for split_name in self._splits():
            split = getattr(self.dataset, split_name)
            width = len(str(max(len(split) - 1, 0)))
            for i in range(len(split)):
                yield Item(
                    id=f"{split_name}/{i:0{width}d}",
                    pixels=split.images[i],
                    true_class=names[int(split.labels[i])],
                )


def absolute_path(path: str | Path) -> str:
    """`path` made absolute, for the `path` column: what a user can open from anywhere.

    `..` is folded away (`/data/run/../images/a.png` -> `/data/images/a.png`) only where
    that names the same file, which it does unless a symbolic link precedes the `..`; links
    themselves are kept as named, not resolved, so the column shows the path the user gave.
    """
    joined = os.path.join(os.getcwd(), path)  # an absolute `path` replaces the cwd
    folded = os.path.normpath(joined)
    if ".." in joined.split(os.sep) and os.path.realpath(joined) != os.path.realpath(folded):
        return joined  # the file the kernel opens; folding would name another one
    return folded


def folder_class(path: str | None, class_names: frozenset[str] | set[str]) -> str | None:
    """The ground truth a folder tree gives an image: the name of the folder that holds the
    file when it is one of the model's classes (`.../cat/0001.png` -> `cat`), else None.

    Only the one folder directly above the file counts (the scored folder itself included:
    scoring `test/cat/` gives its images `cat`), so a `train/` or `2024/` folder above it
    never becomes a class by accident. Local paths and URIs alike (both use `/`).
    """
    if path is None:
        return None
    parts = path.rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 and parts[-2] in class_names else None


def is_cifar(path: Path) -> bool:
    """An archive file, a batch folder, or a folder holding either."""
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz", ".tar"))
    return (
        (path / "data_batch_1").exists()
        or (path / "batches.meta").exists()
        or (path / CIFAR_FOLDER).is_dir()
        or (path / CIFAR_ARCHIVE).is_file()
    )


def open_source(path: str | Path, split: str = "all", all_files: bool = False) -> Source:
    """A folder tree, a CIFAR-10 archive or batch folder, or a text file of paths."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if is_cifar(path):
        return DatasetSource(path, split)
    if path.is_dir():
        return FolderSource(path, all_files)
    return ListSource(path)
