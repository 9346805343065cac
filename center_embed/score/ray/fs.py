"""Where the Ray engine reads and writes: a local path or any URI pyarrow knows (s3://...).

Imports pyarrow only inside functions; never ray, never torch.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme_and_host: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(scheme_and_host + "/")[0]


def filesystem(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow knows."""
    import pyarrow.fs

    text = str(path)
    if not is_uri(text):
        return pyarrow.fs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    fs, inner = pyarrow.fs.FileSystem.from_uri(text)
    return fs, inner.rstrip("/")


def read_file_bytes(path: str) -> bytes:
    """A file's bytes; local paths through open() so errors read as in the local scorer."""
    if not is_uri(path):
        with open(path, "rb", buffering=0) as f:
            return f.read()
    scheme, rest = path.split("://", 1)
    fs = _filesystem_for(f"{scheme}://{rest.split('/', 1)[0]}")
    inner = fs.normalize_path(path) if scheme == "file" else rest
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(out: str, name: str) -> str:
    """The text of the file `name` in the folder `out`."""
    fs, root = filesystem(out)
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read().decode()


def write_text(out: str, name: str, text: str) -> None:
    fs, root = filesystem(out)
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(text.encode())
