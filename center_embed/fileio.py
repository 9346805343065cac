"""Two file chores, written once: atomic writes and SHA-256 digests.

Every artifact (checkpoint, eval.json, ONNX model, cache, Parquet part, report page) is
written under a temporary name beside its target and renamed over it, so a crash or a
kill leaves either the old file or the new one, never a torn one. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; rename it to `path` when the block ends.

    The block writes the file (or, with `directory=True`, fills the folder) at the yielded
    path. On an exception the temporary is removed and `path` is left as it was. The file
    or folder gets ordinary permissions under the umask (mkstemp's are 0600, mkdtemp's
    0700). A directory replaces only a missing target: os.replace cannot swap a non-empty
    folder, so an existing one is an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's are 0700
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        if fsync and not directory:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object], **kwargs: bool) -> Path:
    """Call `write(tmp_path)`, then rename the result to `path` (see `atomic_path`)."""
    with atomic_path(path, **kwargs) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_copy(source: str | Path, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (a model can be large)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
