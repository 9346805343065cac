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


def test_score_says_what_ran_it_and_writes_ordinary_modes(tiny_onnx, tmp_path, capsys):
    """The summary names the runtime, precision and device; under umask 022 an npy folder
    is drwxr-xr-x and its files -rw-r--r--, like the Parquet file; one file is a file."""
    folder = write_image_folder(tmp_path / "in", {"test": 1})
    (folder / "notes.txt").write_text("not an image")
    previous = os.umask(0o022)
    try:
        for fmt, out in (("npy", tmp_path / "npy"), ("parquet", tmp_path / "s.parquet")):
            args = [str(tiny_onnx), str(folder), "--out", str(out), "--format", fmt]
            assert main(["score", *args, "--no-progress", "--all-files"]) == 0
            printed = capsys.readouterr().out.splitlines()
            assert printed[0].startswith("ran onnxruntime fp32 on CPUExecutionProvider (")
            files = [out, *out.iterdir()] if out.is_dir() else [out]
            modes = {oct(p.stat().st_mode & 0o777) for p in files}
            assert modes == ({"0o755", "0o644"} if fmt == "npy" else {"0o644"}), fmt
        assert main(["score", str(tiny_onnx), str(folder), "--out", str(tmp_path / "x.parquet"),
                     "--no-progress"]) == 0  # fmt: skip
        assert "1 file skipped as not images" in capsys.readouterr().out
    finally:
        os.umask(previous)


def test_the_ray_engine_refuses_runtime_choices_it_does_not_make(tiny_onnx, tmp_path, capsys):
    folder = write_image_folder(tmp_path / "in", {"test": 1})
    args = [str(tiny_onnx), str(folder), "--out", str(tmp_path / "s"), "--engine", "ray"]
    assert main(["score", *args, "--runtime", "openvino"]) == 1
    (line,) = error_lines(capsys)
    assert "--engine ray runs onnxruntime at the file's own precision" in line
