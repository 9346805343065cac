"""Issue 15 item 10: what the scores' columns and metadata hold: `true_class` from class
folders (both engines), plain JSON in npy's model.json, an absolute `path`, and a resume of
a partial run from before the `true_class` rule refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from center_embed.errors import UserError
from center_embed.fileio import sha256_file
from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.score.local import score
from center_embed.score.output import SCORES_FORMAT_VERSION, PartWriter, read_scores_metadata
from center_embed.score.sources import absolute_path, open_source
from tests.helpers import TINY_CLASSES, write_cifar

# id -> the true_class the folder rule gives (the model's classes: red, green, blue)
EXPECTED_TRUE_CLASS = {
    "misc/0002.png": None,  # `misc` is no class of the model
    "red/0001.png": "red",
    "red/corrupt.png": "red",  # a failed row still has its ground truth
    "red/sub/0003.png": None,  # only the folder directly above the file counts
    "test/green/0000.png": "green",
    "top.png": None,  # directly in the scored folder (`scored` is no class)
    "train/red/0000.png": "red",
}


@pytest.fixture()
def class_tree(tiny_folder: Path, tmp_path: Path) -> Path:
    """`scored/`: class folders at two depths, a non-class folder, a nested one, a top-level
    image and a truncated PNG."""
    root = tmp_path / "scored"
    for image_id in EXPECTED_TRUE_CLASS:
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_folder / "test" / "blue" / "0000.png", root / image_id)
    good = (root / "top.png").read_bytes()
    (root / "red" / "corrupt.png").write_bytes(good[: len(good) // 2])
    return root


def true_classes(table: pa.Table) -> dict[str, str | None]:
    return dict(zip(table["id"].to_pylist(), table["true_class"].to_pylist(), strict=True))


def test_true_class_is_the_class_folder_in_both_engines(tiny_onnx, class_tree, tmp_path):
    out = tmp_path / "s.parquet"
    score(tiny_onnx, class_tree, out, batch_size=3, progress=False)
    local = pq.read_table(out)
    assert true_classes(local) == EXPECTED_TRUE_CLASS
    assert local.column("error").to_pylist().count(None) == len(EXPECTED_TRUE_CLASS) - 1

    # The Ray engine's row builder (ray.ScoreBatches; no cluster needed to call it)
    # on the same paths gives the same column; a `true_class` an input gives is kept even
    # when the model has no such class.
    from center_embed.score.ray import ScoreBatches

    given = ["class9"] + [None] * (local.num_rows - 1)
    batch = pa.table({"id": local.column("id"), "path": local.column("path"),
                      "true_class": pa.array(given, pa.string())})  # fmt: skip
    rows = ScoreBatches(str(tiny_onnx))(batch)
    assert rows.column("true_class").to_pylist() == ["class9", *local["true_class"][1:].to_pylist()]
    rows = ScoreBatches(str(tiny_onnx))(batch.drop_columns(["true_class"]))
    assert true_classes(rows) == EXPECTED_TRUE_CLASS


def test_true_class_of_a_one_class_folder_and_of_a_list(tiny_onnx, class_tree, tmp_path):
    out = tmp_path / "red.parquet"
    score(tiny_onnx, class_tree / "red", out, progress=False)  # the scored folder's own name
    assert true_classes(pq.read_table(out)) == {
        "0001.png": "red",
        "corrupt.png": "red",
        "sub/0003.png": None,
    }
    listed = tmp_path / "paths.txt"
    listed.write_text("scored/test/green/0000.png\nscored/misc/0002.png\n")
    score(tiny_onnx, listed, tmp_path / "list.parquet", progress=False)
    assert pq.read_table(tmp_path / "list.parquet").column("true_class").to_pylist() == [
        "green",
        None,
    ]


def test_npy_model_json_is_plain_json(tiny_onnx, class_tree, tmp_path):
    info = OnnxModel(tiny_onnx).info
    score(tiny_onnx, class_tree, tmp_path / "s.npy", fmt="npy", progress=False)
    meta = json.loads((tmp_path / "s.npy" / "model.json").read_text())
    assert meta["class_names"] == info.class_names == sorted(TINY_CLASSES)
    assert meta["scores_version"] == 3
    assert (meta["model_format_version"], meta["unknown_score"]) == (2, info.unknown_score)
    assert meta["embedding_dim"] == info.embedding_dim
    assert meta["source"] == {"kind": "folder", "path": str(class_tree), "all_files": False}
    assert meta["distance"] == info.distance
    assert meta["unknown_threshold"] == pytest.approx(info.unknown_threshold)
    nested = [k for k, v in meta.items() if isinstance(v, str) and v[:1] in ("[", "{", '"')]
    assert nested == []
    # The Parquet metadata keeps its strings (readers of earlier files are unaffected) and
    # read_scores_metadata gives exactly model.json's values.
    score(tiny_onnx, class_tree, tmp_path / "s.parquet", progress=False)
    raw = pq.read_schema(tmp_path / "s.parquet").metadata
    assert json.loads(raw[b"center_embed.class_names"]) == info.class_names
    assert raw[b"center_embed.scores_version"] == b"3"
    assert read_scores_metadata(raw) == meta


def test_path_is_absolute_with_dotdot_folded(tiny_onnx, class_tree, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    score(tiny_onnx, Path("../scored/red"), tmp_path / "s.parquet", progress=False)
    paths = pq.read_table(tmp_path / "s.parquet").column("path").to_pylist()
    assert paths[0] == str(tmp_path / "scored" / "red" / "0001.png")
    assert all(".." not in p.split("/") for p in paths)


def test_path_keeps_dotdot_where_a_link_precedes_it(tiny_onnx, class_tree, tmp_path):
    """`link/../x` is not `x` beside `link` when `link` is a symbolic link: folding it would
    read (and name) another file."""
    (tmp_path / "real" / "lists").mkdir(parents=True)
    (tmp_path / "real" / "imgs").mkdir()
    shutil.copy(class_tree / "top.png", tmp_path / "real" / "imgs" / "a.png")
    (tmp_path / "real" / "lists" / "paths.txt").write_text("../imgs/a.png\n")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "lists")
    score(tiny_onnx, tmp_path / "link" / "paths.txt", tmp_path / "s.parquet", progress=False)
    (row,) = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert row["error"] is None
    assert row["path"] == str(tmp_path / "link") + "/../imgs/a.png"
    assert absolute_path(tmp_path / "real" / "lists" / ".." / "imgs") == str(
        tmp_path / "real" / "imgs"
    )


def _interrupted_run(model, source, out: Path, monkeypatch) -> Path:
    """A partial run with one part written (Ctrl-C on the second batch); its manifest."""
    write = PartWriter.write
    calls = []

    def interrupted(self, table):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write(self, table)

    with monkeypatch.context() as patch:
        patch.setattr(PartWriter, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            score(model, source, out, batch_size=2, row_group_size=2, progress=False)
    manifest = out.with_name(out.name + ".partial") / "manifest.json"
    assert len(list(manifest.parent.glob("part-*.parquet"))) == 1
    return manifest


def _as_before_the_rule(manifest: Path) -> None:
    before = json.loads(manifest.read_text())
    del before["true_class"]  # what an earlier center-embed wrote
    manifest.write_text(json.dumps(before))


def test_resume_of_a_partial_run_from_before_the_rule(tiny_onnx, class_tree, tmp_path,
                                                      monkeypatch):  # fmt: skip
    out = tmp_path / "s.parquet"
    manifest = _interrupted_run(tiny_onnx, class_tree, out, monkeypatch)
    _as_before_the_rule(manifest)
    with pytest.raises(UserError, match="earlier version of center-embed.*--overwrite"):
        score(tiny_onnx, class_tree, out, resume=True, progress=False)
    score(tiny_onnx, class_tree, out, overwrite=True, progress=False)
    assert true_classes(pq.read_table(out)) == EXPECTED_TRUE_CLASS

    # A dataset archive's true_class never depended on the rule: its resume goes on.
    archive, _ = write_cifar(tmp_path, as_archive=True, per_batch=2)
    out = tmp_path / "cifar.parquet"
    _as_before_the_rule(_interrupted_run(tiny_onnx, archive, out, monkeypatch))
    summary = score(tiny_onnx, archive, out, resume=True, progress=False)
    assert summary.resumed_from == 2 and summary.rows == 12


def test_ray_resume_of_a_run_of_the_previous_format(tiny_onnx, class_tree, tmp_path, monkeypatch):
    """Format 1 had no atypicality column, format 2 no unknown_score: their parts must not
    be mixed with version 3's."""
    ray = pytest.importorskip("ray")
    from center_embed.score import ray as ray_engine
    from center_embed.score.output import TRUE_CLASS_RULE

    out = tmp_path / "scores"
    out.mkdir()
    run = {"format_version": 1, "model_sha256": sha256_file(tiny_onnx),
           "source": open_source(class_tree).describe(), "rows_per_block": 16,
           "true_class": TRUE_CLASS_RULE}  # fmt: skip
    (out / ray_engine.RUN_FILE).write_text(json.dumps(run))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert SCORES_FORMAT_VERSION == 3
    with pytest.raises(UserError, match="the run differs: format_version: was 1, now 3"):
        ray_engine.score_on_ray(str(tiny_onnx), str(class_tree), str(out), resume=True,
                                options=RuntimeOptions(device="cpu"), rows_per_block=16,
                                progress=False)  # fmt: skip


def test_ray_resume_of_a_run_from_before_the_rule(tiny_onnx, class_tree, tmp_path, monkeypatch):
    """score_on_ray refuses before it uses the cluster, so no Ray is started here."""
    ray = pytest.importorskip("ray")
    from center_embed.score import ray as ray_engine

    out = tmp_path / "scores"
    out.mkdir()
    run = {"format_version": SCORES_FORMAT_VERSION, "model_sha256": sha256_file(tiny_onnx),
           "source": open_source(class_tree).describe(), "rows_per_block": 16}  # fmt: skip
    (out / ray_engine.RUN_FILE).write_text(json.dumps(run))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(UserError, match="the run differs: true_class: was None"):
        ray_engine.score_on_ray(str(tiny_onnx), str(class_tree), str(out), resume=True,
                                options=RuntimeOptions(device="cpu"), rows_per_block=16,
                                progress=False)  # fmt: skip
