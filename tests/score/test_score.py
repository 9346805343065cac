"""Batch scoring: rows per image, failures as rows, the Parquet schema, resume, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from center_embed.cli import main
from center_embed.errors import UserError
from center_embed.runtime import OnnxModel
from center_embed.score.local import score
from center_embed.score.output import PartWriter
from tests.helpers import ROOT, write_cifar

MODEL_COLUMNS = ["label", "class_name", "min_distance", "unknown_score", "unknown", "atypicality",
                 "distances", "embedding"]  # fmt: skip


@pytest.fixture()
def messy_folder(tiny_folder: Path, tmp_path: Path) -> Path:
    """Six images in nested folders, a truncated PNG, text named .jpg, notes, a hidden file."""
    root = tmp_path / "images"
    for name, sub in (("red", "a"), ("green", "a/deeper"), ("blue", "b")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            shutil.copy(tiny_folder / "test" / name / f"{i:04d}.png", root / sub / f"{name}{i}.png")
    good = (tiny_folder / "test" / "red" / "0005.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "fake.jpg").write_text("this is not a JPEG")
    (root / "notes.txt").write_text("not an image, and not named like one")
    (root / ".hidden.png").write_bytes(good)
    return root


def read(path: Path) -> pa.Table:
    return pq.read_table(path)


def test_folder_with_broken_files_scores_every_image(tiny_onnx, messy_folder, tmp_path):
    out = tmp_path / "scores.parquet"
    summary = score(tiny_onnx, messy_folder, out, batch_size=4, row_group_size=4, progress=False)
    table = read(out)
    ids = table.column("id").to_pylist()
    assert ids == [
        "a/deeper/green0.png",
        "a/deeper/green1.png",
        "a/red0.png",
        "a/red1.png",
        "b/blue0.png",
        "b/blue1.png",
        "b/fake.jpg",
        "corrupt.png",
    ]
    errors = dict(zip(ids, table.column("error").to_pylist(), strict=True))
    assert errors["corrupt.png"].startswith("corrupt or truncated image")
    assert errors["b/fake.jpg"] == "not an image format Pillow can read"
    assert sum(e is not None for e in errors.values()) == 2
    assert (summary.rows, summary.failed, summary.skipped, summary.scored) == (8, 2, 1, 8)
    assert sorted(i for i, _ in summary.failures) == ["b/fake.jpg", "corrupt.png"]

    rows = table.to_pylist()
    for row in rows:
        if row["error"] is not None:
            assert all(row[c] is None for c in MODEL_COLUMNS)
    # The scored rows hold exactly what the model gives on those images decoded directly.
    model = OnnxModel(tiny_onnx)
    good = [r for r in rows if r["error"] is None]
    expected = model.run(np.stack([model.decode(messy_folder / r["id"]) for r in good]))
    np.testing.assert_array_equal([r["label"] for r in good], expected["labels"])
    np.testing.assert_allclose([r["embedding"] for r in good], expected["embeddings"], rtol=1e-5)
    np.testing.assert_allclose([r["distances"] for r in good], expected["distances"], rtol=1e-5)
    for column, name in (("min_distance", "min_distances"), ("unknown_score", "unknown_scores")):
        np.testing.assert_allclose([r[column] for r in good], expected[name], rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    np.testing.assert_allclose([r["atypicality"] for r in good], expected["atypicality"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    names = model.info.class_names
    assert [r["class_name"] for r in good] == [names[k] for k in expected["labels"]]
    assert [r["class_name"] for r in good] == ["green"] * 2 + ["red"] * 2 + ["blue"] * 2
    # The flag uses the nearest class's own threshold (per-class calibration).
    flags = model.info.unknown(expected["unknown_scores"], expected["labels"])
    assert [r["unknown"] for r in good] == flags.tolist()
    assert [r["path"] for r in good] == [str(messy_folder / r["id"]) for r in good]
    assert not (tmp_path / "scores.parquet.partial").exists()


def test_a_format_1_file_scores_as_it_declares(tiny_plain_onnx, tiny_folder, tmp_path):
    """Four outputs: an atypicality of 0, and the min distance as the unknown score."""
    out = tmp_path / "plain.parquet"
    score(tiny_plain_onnx, tiny_folder / "test", out, progress=False)
    table = read(out)
    assert table.num_rows == 48 and table.column("atypicality").to_pylist() == [0.0] * 48
    assert table.column("unknown_score").to_pylist() == table.column("min_distance").to_pylist()
    assert table.schema.metadata[b"center_embed.model_format_version"] == b"1"


def test_parquet_schema_and_metadata(tiny_onnx, messy_folder, tmp_path):
    out = tmp_path / "s.parquet"
    score(tiny_onnx, messy_folder, out, progress=False)
    model = OnnxModel(tiny_onnx)
    c, d = model.info.num_classes, model.info.embedding_dim
    schema = pq.read_schema(out)
    assert [(f.name, f.type, f.nullable) for f in schema] == [
        ("id", pa.string(), False),
        ("path", pa.string(), True),
        ("label", pa.int32(), True),
        ("class_name", pa.string(), True),
        ("min_distance", pa.float32(), True),
        ("unknown_score", pa.float32(), True),
        ("unknown", pa.bool_(), True),
        ("atypicality", pa.float32(), True),
        ("distances", pa.list_(pa.float32(), c), True),
        ("embedding", pa.list_(pa.float32(), d), True),
        ("true_class", pa.string(), True),
        ("error", pa.string(), True),
    ]
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert json.loads(meta["center_embed.class_names"]) == model.info.class_names
    assert json.loads(meta["center_embed.unknown_threshold"]) == model.info.unknown_threshold
    assert meta["center_embed.embedding_dim"] == str(d)
    assert json.loads(meta["center_embed.source"])["kind"] == "folder"


def test_resume_after_ctrl_c_gives_the_same_file(
    tiny_onnx, tiny_folder, tmp_path, monkeypatch, capsys
):
    args = [
        str(tiny_onnx),
        str(tiny_folder),
        "--batch-size",
        "8",
        "--row-group-size",
        "16",
        "--no-progress",
    ]
    whole = tmp_path / "whole.parquet"
    assert main(["score", *args, "--out", str(whole)]) == 0

    # Ctrl-C reaches the main thread (Python delivers it there) as the fifth batch arrives.
    write = PartWriter.write
    monkeypatch.setattr(PartWriter, "write", _interrupt_on_call(write, 5))
    out = tmp_path / "resumed.parquet"
    assert main(["score", *args, "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists()
    parts = sorted((tmp_path / "resumed.parquet.partial").glob("part-*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [16, 16]  # four whole batches

    monkeypatch.setattr(PartWriter, "write", write)
    assert main(["score", *args, "--out", str(out)]) == 1  # refuses without --resume
    assert main(["score", *args, "--out", str(out), "--resume"]) == 0
    assert "after 32 written before" in capsys.readouterr().out
    assert read(out).equals(read(whole))
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "resumed.parquet.partial").exists()
    assert main(["score", *args, "--out", str(out), "--resume"]) == 0  # complete: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_resume_after_kill_loses_nothing(tiny_onnx, tiny_folder, tmp_path):
    """SIGKILL mid-run (no chance to clean up), then --resume: the same rows as one run."""
    images = sorted((tiny_folder / "train").rglob("*.png"))
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(str(p) for p in images * 25) + "\n")  # 4800 lines
    out, partial = tmp_path / "killed.parquet", tmp_path / "killed.parquet.partial"
    args = [
        "score",
        str(tiny_onnx),
        str(listing),
        "--batch-size",
        "8",
        "--row-group-size",
        "64",
        "--no-progress",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "center_embed.cli", *args, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(list(partial.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = sum(pq.read_metadata(p).num_rows for p in partial.glob("part-*.parquet"))
    assert 0 < done < 4800

    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole.parquet")]) == 0
    resumed, whole = read(out), read(tmp_path / "whole.parquet")
    assert resumed.num_rows == 4800 and resumed.equals(whole)


def test_list_of_paths(tiny_onnx, tiny_folder, tmp_path):
    shutil.copytree(tiny_folder / "test" / "blue", tmp_path / "blue")
    listing = tmp_path / "paths.txt"
    absolute = tiny_folder / "test" / "green" / "0003.png"
    listing.write_text(f"# images to score\nblue/0001.png\n\n{absolute}\nblue/missing.png\n")
    out = tmp_path / "s.parquet"
    summary = score(tiny_onnx, listing, out, progress=False)
    rows = read(out).to_pylist()
    assert [r["id"] for r in rows] == ["blue/0001.png", str(absolute), "blue/missing.png"]
    assert [r["class_name"] for r in rows] == ["blue", "green", None]
    assert rows[2]["error"] == "cannot read file: No such file or directory"
    assert rows[0]["path"] == str(tmp_path / "blue" / "0001.png")
    assert (summary.rows, summary.failed) == (3, 1)


def test_cifar_archive_input(tiny_onnx, tmp_path):
    archive, batches = write_cifar(tmp_path, as_archive=True, per_batch=5)
    out = tmp_path / "s.parquet"
    assert (
        main(
            [
                "score",
                str(tiny_onnx),
                str(archive),
                "--split",
                "test",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = read(out).to_pylist()
    test = batches["test_batch"]
    assert [r["id"] for r in rows] == [f"test/{i}" for i in range(5)]
    assert [r["true_class"] for r in rows] == [f"class{k}" for k in test[b"labels"]]
    pixels = test[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    expected = OnnxModel(tiny_onnx).run(np.ascontiguousarray(pixels))
    np.testing.assert_allclose([r["embedding"] for r in rows], expected["embeddings"], rtol=1e-5)
    assert all(r["path"] is None and r["error"] is None for r in rows)
    everything = score(tiny_onnx, archive, tmp_path / "all.parquet", progress=False)
    assert everything.rows == 30  # five train batches and the test batch, five images each


def test_npy_format_holds_the_parquet_columns(tiny_onnx, messy_folder, tmp_path):
    score(tiny_onnx, messy_folder, tmp_path / "s.parquet", progress=False)
    out = tmp_path / "s.npy"
    score(tiny_onnx, messy_folder, out, fmt="npy", progress=False)
    table = read(tmp_path / "s.parquet")
    failed = np.array([e is not None for e in table.column("error").to_pylist()])
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.int64 and (labels[failed] == -1).all()
    np.testing.assert_array_equal(labels[~failed], table.column("label").drop_null().to_numpy())
    embeddings = np.load(out / "embeddings.npy")
    assert np.isnan(embeddings[failed]).all()
    np.testing.assert_array_equal(
        embeddings[~failed], np.array(table.column("embedding").drop_null().to_pylist())
    )
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == table.column("id").to_pylist()
    model_meta = json.loads((out / "model.json").read_text())
    assert model_meta["class_names"] == OnnxModel(tiny_onnx).info.class_names  # plain JSON


def test_user_mistakes(tiny_onnx, tiny_folder, messy_folder, tmp_path):
    out = tmp_path / "s.parquet"
    score(tiny_onnx, messy_folder, out, progress=False)
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        score(tiny_onnx, messy_folder, out, progress=False)
    score(tiny_onnx, messy_folder, out, overwrite=True, progress=False)
    for fmt in ("parquet", "npy"):  # --overwrite never deletes a folder it did not write
        with pytest.raises(UserError, match="is a folder"):
            score(tiny_onnx, messy_folder, tmp_path, fmt=fmt, overwrite=True, progress=False)
    assert (tmp_path / "s.parquet").is_file()
    with pytest.raises(UserError, match="input not found"):
        score(tiny_onnx, tmp_path / "nowhere", tmp_path / "x.parquet", progress=False)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        score(messy_folder / "notes.txt", messy_folder, tmp_path / "x.parquet", progress=False)
    assert (
        main(
            [
                "score",
                str(tiny_onnx),
                str(messy_folder),
                "--split",
                "test",
                "--out",
                str(tmp_path / "y.parquet"),
            ]
        )
        == 1
    )

    # A resume must continue the same job: same model, and the input unchanged so far.
    partial = tmp_path / "r.parquet.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text(json.dumps({"format_version": 1, "model_sha256": "0"}))
    with pytest.raises(UserError, match="cannot resume .* model_sha256"):
        score(tiny_onnx, messy_folder, tmp_path / "r.parquet", resume=True, progress=False)
    shutil.rmtree(partial)
    shutil.copytree(tiny_folder / "test", tmp_path / "input")
    out = tmp_path / "c.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PartWriter, "write", _interrupt_on_call(PartWriter.write, 2))
        with pytest.raises(KeyboardInterrupt):
            score(
                tiny_onnx, tmp_path / "input", out, batch_size=8, row_group_size=8, progress=False
            )
    (tmp_path / "input" / "blue" / "0000.png").unlink()  # the input shifts under the resume
    with pytest.raises(UserError, match="input changed"):
        score(tiny_onnx, tmp_path / "input", out, batch_size=8, resume=True, progress=False)


def _interrupt_on_call(method, n: int):
    """`method`, raising KeyboardInterrupt instead of running on its n-th call."""
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return method(*args, **kwargs)

    return interrupted


def test_scoring_never_imports_torch(tiny_onnx, messy_folder, tmp_path):
    code = (
        "import sys; from center_embed.cli import main\n"
        f"rc = main(['score', {str(tiny_onnx)!r}, {str(messy_folder)!r}, "
        f"'--out', {str(tmp_path / 's.parquet')!r}, '--no-progress'])\n"
        "print(rc, 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.stdout.strip().splitlines()[-1] == "0 False", result.stderr


def test_path_column_is_absolute_for_relative_inputs(tiny_onnx, tiny_folder, tmp_path, monkeypatch):
    """Issue 15 item 10: `path` does not depend on the directory score was started from."""
    shutil.copytree(tiny_folder / "test" / "blue", tmp_path / "in" / "blue")
    (tmp_path / "paths.txt").write_text("in/blue/0001.png\n")
    monkeypatch.chdir(tmp_path)
    score(tiny_onnx, Path("in"), Path("folder.parquet"), progress=False)
    rows = read(tmp_path / "folder.parquet").to_pylist()
    assert rows[0]["id"] == "blue/0000.png"  # ids stay relative to the input
    assert rows[0]["path"] == str(tmp_path / "in" / "blue" / "0000.png")
    score(tiny_onnx, Path("paths.txt"), Path("list.parquet"), progress=False)
    (row,) = read(tmp_path / "list.parquet").to_pylist()
    assert row["id"] == "in/blue/0001.png"
    assert row["path"] == str(tmp_path / "in" / "blue" / "0001.png")
