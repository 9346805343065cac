"""`score --engine ray`: the local scorer's rows on Ray Data, retries, resume, the extra.

One local Ray (2 CPUs, loopback, no dashboard) is started for this module and shut down
after it; starting it costs seconds, so one end-to-end case runs by default and the
fault-tolerance cases are marked slow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from center_embed.cli import main
from center_embed.runtime import RuntimeOptions
from center_embed.score.local import score
from center_embed.score.ray import SUCCESS_FILE, ScoreBatches, parse_part_name, score_on_ray
from center_embed.score.ray import driver as ray_driver
from tests.helpers import ROOT

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    # Workers inherit the environment of the Ray started here: this checkout on the import
    # path (CI installs it too; a bare checkout needs this).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture()
def images(tiny_folder: Path, tmp_path: Path) -> Path:
    """48 good images in class folders, a truncated PNG, text named .jpg, a hidden file."""
    root = tmp_path / "images"
    shutil.copytree(tiny_folder / "test", root)
    good = (tiny_folder / "test" / "red" / "0005.png").read_bytes()
    (root / "red" / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "blue" / "fake.jpg").write_text("this is not a JPEG")
    (root / ".hidden.png").write_bytes(good)
    return root


def killing_actor(trigger: Path, after: int) -> type:
    """ScoreBatches whose first instance to claim `trigger` (by renaming it) SIGKILLs its
    own process after `after` batches: once, however often Ray restarts the actor.

    Defined in a function, so Ray pickles the class by value: its workers need not import
    the tests."""

    class KillingScoreBatches(ScoreBatches):
        batches = 0

        def __call__(self, batch):
            rows = super().__call__(batch)
            self.batches += 1
            if self.batches >= after:
                try:
                    os.rename(trigger, f"{trigger}.claimed")  # one actor only, once
                except OSError:
                    return rows
                os.kill(os.getpid(), signal.SIGKILL)
            return rows

    return KillingScoreBatches


def run_ray(model, images, out, **kwargs):
    options = {"batch_size": 8, "rows_per_block": 16, "progress": False,
               "options": RuntimeOptions(device="cpu")}  # fmt: skip
    return score_on_ray(str(model), str(images), str(out), **{**options, **kwargs})


def assert_same_rows(expected, actual) -> None:
    """Identical ids, labels, paths and error rows; embeddings and distances within 1e-6."""
    for column in ("id", "path", "label", "class_name", "unknown", "error", "true_class"):
        assert actual.column(column).to_pylist() == expected.column(column).to_pylist(), column
    ok = np.array([e is None for e in expected.column("error").to_pylist()])
    for column in ("embedding", "distances", "min_distance", "atypicality"):
        want = np.array(expected.column(column).to_pylist(), dtype=object)[ok].tolist()
        got = np.array(actual.column(column).to_pylist(), dtype=object)[ok].tolist()
        np.testing.assert_allclose(np.array(got, np.float64), np.array(want, np.float64),
                                   rtol=0, atol=1e-6, err_msg=column)  # fmt: skip


def test_ray_engine_gives_the_local_rows(local_ray, tiny_onnx, images, tmp_path, capsys):
    local_out = tmp_path / "local.parquet"
    score(tiny_onnx, images, local_out, batch_size=8, progress=False)
    ray_out = tmp_path / "scores"
    code = main(["score", str(tiny_onnx), str(images), "--out", str(ray_out), "--engine", "ray",
                 "--batch-size", "8", "--row-group-size", "16", "--device", "cpu",
                 "--no-progress"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0
    assert "50 rows, 2 failed" in printed.out
    assert "note: 50 images is a small input for --engine ray" in printed.err
    expected, actual = pq.read_table(local_out), pq.read_table(ray_out)
    assert actual.schema.equals(expected.schema, check_metadata=True)
    assert actual.num_rows == 50
    assert_same_rows(expected, actual)
    errors = dict(zip(actual["id"].to_pylist(), actual["error"].to_pylist(), strict=True))
    assert errors["blue/fake.jpg"] == "not an image format Pillow can read"
    ranges = sorted(parse_part_name(p.name) for p in ray_out.glob("part-*.parquet"))
    # The parts tile rows 0..49 exactly, without gaps or overlaps. How many there are is
    # Ray's choice: it may hand one writer the rows of two blocks (seen: (32, 49)).
    assert ranges[0][0] == 0
    assert [first for first, _ in ranges] == [0] + [last + 1 for _, last in ranges[:-1]]
    assert ranges[-1][1] == 49
    assert (ray_out / SUCCESS_FILE).is_file()
    # a second run without --resume or --overwrite refuses; with --resume it has nothing to do
    assert main(["score", str(tiny_onnx), str(images), "--out", str(ray_out), "--engine",
                 "ray", "--row-group-size", "16", "--device", "cpu"]) == 1  # fmt: skip
    assert "exists" in capsys.readouterr().err
    again = run_ray(tiny_onnx, images, ray_out, resume=True)
    assert again.scored == 0 and again.rows == 50


@pytest.mark.slow
def test_killed_actor_is_retried_without_loss_or_duplicates(
    local_ray, tiny_onnx, images, tmp_path, monkeypatch
):
    reference = tmp_path / "reference"
    run_ray(tiny_onnx, images, reference)
    kill_trigger = tmp_path / "kill-trigger"
    kill_trigger.touch()
    # the first actor to finish 2 batches SIGKILLs itself
    monkeypatch.setattr(ray_driver, "ScoreBatches", killing_actor(kill_trigger, after=2))
    killed = tmp_path / "killed"
    summary = run_ray(tiny_onnx, images, killed)
    assert not kill_trigger.exists()
    assert Path(str(kill_trigger) + ".claimed").exists()  # the kill did happen
    assert summary.rows == 50
    expected, actual = pq.read_table(reference), pq.read_table(killed)
    ids = actual.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 50
    assert_same_rows(expected, actual)


@pytest.mark.slow
def test_resume_scores_only_the_missing_parts(local_ray, tiny_onnx, images, tmp_path):
    out = tmp_path / "scores"
    run_ray(tiny_onnx, images, out)
    complete = pq.read_table(out)
    # an interrupted run: one part never written, another half written, no _SUCCESS
    lost = sorted(out.glob("part-*.parquet"))[1]
    first, last = parse_part_name(lost.name)
    lost.unlink()
    (out / f".{lost.name}.123.tmp").write_bytes(b"PAR1 half")
    (out / SUCCESS_FILE).unlink()
    summary = run_ray(tiny_onnx, images, out, resume=True)
    assert summary.scored == last - first + 1
    assert summary.resumed_from == 50 - summary.scored
    assert not list(out.glob(".*.tmp"))
    assert_same_rows(complete, pq.read_table(out))
    assert (out / SUCCESS_FILE).is_file()


@pytest.mark.slow
def test_score_batches_in_a_users_pipeline(local_ray, tiny_onnx, images, tmp_path):
    ds = ray.data.read_binary_files(str(images / "green"), include_paths=True)
    ds = ds.map_batches(ScoreBatches, fn_constructor_kwargs={"model": str(tiny_onnx)},
                        batch_format="pyarrow", batch_size=8, concurrency=1)  # fmt: skip
    rows = {Path(row["path"]).name: row for row in ds.take_all()}
    local_out = tmp_path / "local.parquet"
    score(tiny_onnx, images / "green", local_out, progress=False)
    local = {row["id"]: row for row in pq.read_table(local_out).to_pylist()}
    assert sorted(rows) == sorted(local) and len(rows) == 16
    for name, row in rows.items():
        assert row["label"] == local[name]["label"] and row["error"] is None
        np.testing.assert_allclose(row["embedding"], local[name]["embedding"], atol=1e-6)


def test_ray_flags_refused_with_npy_and_a_missing_ray_names_the_extra(
    tiny_onnx, images, tmp_path, capsys, monkeypatch
):
    args = ["score", str(tiny_onnx), str(images), "--out", str(tmp_path / "o"), "--engine", "ray"]
    assert main([*args, "--format", "npy"]) == 1
    assert "--engine ray writes Parquet" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "pip install '.[ray]'" in err


def test_package_imports_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import center_embed, center_embed.cli.score, center_embed.score.ray\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
