"""Atomic writes leave the old file or the new one, never a torn one."""

from __future__ import annotations

import hashlib
import os

import pytest

from center_embed.fileio import atomic_path, atomic_write_text, sha256_file


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as tmp:
        (tmp / "x").write_text("1")
        raise RuntimeError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target, directory=True) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
