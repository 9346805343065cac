"""`train --download`: fetch the canonical CIFAR-10 archive once, verify it, unpack it.

    <root>/cifar-10-python.tar.gz     the archive, kept so the folder can be rebuilt offline
    <root>/cifar-10-batches-py/       what data.load_dataset reads (then caches as uint8)

Every step writes beside its target and renames, so an interrupted or failed download,
a wrong checksum or a damaged archive leaves no partial file behind, only a message that
says why. Processes that download into the same folder at once (torchrun) take turns
through a lock file in the temporary directory; the later ones find the work done.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from center_embed.data import CIFAR_ARCHIVE, CIFAR_FOLDER, CIFAR_TEST_BATCH, CIFAR_TRAIN_BATCHES
from center_embed.errors import UserError
from center_embed.fileio import atomic_path

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FILES = [*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, "batches.meta"]
CHUNK = 1 << 20


def download_cifar10(
    root: str | Path,
    url: str | None = None,
    md5: str | None = None,
    log: Callable[[str], None] = print,
    timeout: float = 60.0,
) -> Path:
    """Make sure `root` holds CIFAR-10; download, verify and unpack it if not.

    Returns the folder of batches. `root` may also name the archive itself
    (`.../cifar-10-python.tar.gz`), which is then downloaded and verified but not unpacked
    (the readers take the archive as it is).
    """
    url, md5 = url or CIFAR10_URL, md5 or CIFAR10_MD5
    root = Path(root).expanduser()
    if root.name.endswith((".tar.gz", ".tgz")):
        archive, folder = root, None
    elif root.is_file():
        raise UserError(f"--download needs a folder to download into; {root} is a file")
    else:
        archive, folder = root / CIFAR_ARCHIVE, root / CIFAR_FOLDER
        if _complete(folder, archive):
            return folder
        if folder.exists():  # ours appear whole (a rename): this one is someone else's
            raise UserError(
                f"{folder} exists but lacks some of {', '.join(CIFAR_FILES)}; "
                "delete it and run again"
            )
        if (root / "train").is_dir() and (root / "test").is_dir():
            log(f"{root} holds an image folder; nothing to download")
            return root
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {archive.parent}: {e.strerror or e}") from None
    with _lock(archive):
        if _complete(folder, archive):  # another process did it while we waited
            return folder or archive
        if archive.exists():
            got = _md5_of(archive)
            if got != md5:
                raise UserError(
                    f"{archive} exists but its md5 is {got}, not {md5}: it is damaged or "
                    "not the CIFAR-10 python archive. Delete it and run again."
                )
        else:
            _fetch(url, archive, md5, log, timeout)
        if folder is not None:
            _unpack(archive, folder)
            log(f"unpacked {archive} into {folder}")
    return folder or archive


def _complete(folder: Path | None, archive: Path) -> bool:
    if folder is None:
        return False  # an archive named on its own is checked on every call
    return all((folder / name).is_file() for name in CIFAR_FILES)


@contextlib.contextmanager
def _lock(archive: Path) -> Iterator[None]:
    """An exclusive lock per target, outside the user's folder (nothing to clean up)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads still end in atomic renames
        yield
        return
    key = hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"center-embed-download-{key}.lock"
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, archive: Path, md5: str, log: Callable[[str], None], timeout: float) -> None:
    """Stream `url` into a temporary file beside `archive`, hashing as it comes; rename
    it into place only when complete and verified."""
    log(f"downloading {url}")
    try:
        with atomic_path(archive) as tmp:
            _stream(url, tmp, md5, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"download of {url} failed ({reason}); nothing was kept") from None
    log(f"verified md5 {md5}; saved {archive}")


def _stream(url: str, path: Path, md5: str, timeout: float) -> None:
    """Write what `url` answers into `path`; UserError if it is short or its md5 is wrong."""
    from tqdm import tqdm

    digest, received = hashlib.md5(usedforsecurity=False), 0
    with path.open("wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        bar = tqdm(
            total=expected, unit="B", unit_scale=True, desc=CIFAR_ARCHIVE, leave=False,
            disable=not sys.stderr.isatty(),
        )  # fmt: skip
        with bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise UserError(
            f"download of {url} ended early: {received} of {expected} bytes; "
            "nothing was kept, run again"
        )
    if digest.hexdigest() != md5:
        raise UserError(
            f"download of {url} has md5 {digest.hexdigest()}, expected {md5}: the file "
            "is damaged or not the CIFAR-10 python archive; nothing was kept"
        )


def _unpack(archive: Path, folder: Path) -> None:
    """Extract the batch files into a temporary folder beside `folder`, then rename it."""
    try:
        with atomic_path(folder, directory=True) as tmp:
            _extract_batches(archive, tmp)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"archive {archive} is truncated or corrupt ({e})") from None
    except OSError as e:
        if _complete(folder, archive):  # another process unpacked it first: a lost race
            return
        raise UserError(f"cannot unpack {archive} into {folder}: {e.strerror or e}") from None


def _extract_batches(archive: Path, folder: Path) -> None:
    found = set()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = Path(member.name).name
            if member.isfile() and name in CIFAR_FILES and name not in found:
                source = tar.extractfile(member)
                with (folder / name).open("wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)  # type: ignore[misc]
                found.add(name)
    missing = [n for n in CIFAR_FILES if n not in found]
    if missing:
        raise UserError(f"{archive} lacks CIFAR-10 files: {', '.join(missing)}")
