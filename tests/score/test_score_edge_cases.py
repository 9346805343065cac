"""Scoring inputs a user trips over: a symlink loop, an empty folder, a 0-byte file, and a
run that fails before writing anything (no `.partial` left to block the next run)."""

from __future__ import annotations

import os

import pytest

from center_embed.cli import main
from tests.helpers import write_image_folder


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_a_symlink_loop_and_an_empty_file_are_failed_rows(tiny_onnx, tmp_path, capsys):
    folder = write_image_folder(tmp_path / "in", {"test": 1})
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    (folder / "zero.png").write_bytes(b"")
    out = tmp_path / "s.parquet"
    assert main(["score", str(tiny_onnx), str(folder), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "6 rows, 3 failed" in printed
    assert "failed: a.png: cannot read file: Too many levels of symbolic links" in printed
    assert "failed: zero.png: empty file (0 bytes)" in printed
    assert not (tmp_path / "s.parquet.partial").exists()


def test_an_empty_folder_is_an_error_not_an_empty_file(tiny_onnx, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "s.parquet"
    assert main(["score", str(tiny_onnx), str(empty), "--out", str(out)]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: no images found in {empty.resolve()}")
    assert "--all-files" in line
    assert not out.exists() and not (tmp_path / "s.parquet.partial").exists()


def test_a_run_failing_before_its_first_part_leaves_no_partial(tiny_onnx, tmp_path, monkeypatch):
    import center_embed.score.local as local

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in decoding")

    monkeypatch.setattr(local, "_decode", broken)
    folder = write_image_folder(tmp_path / "in", {"test": 1})
    out = tmp_path / "s.parquet"
    with pytest.raises(RuntimeError, match="a bug in decoding"):
        local.score(tiny_onnx, folder, out, progress=False)
    assert not out.exists() and not (tmp_path / "s.parquet.partial").exists()
