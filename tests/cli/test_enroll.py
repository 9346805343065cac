"""`center-embed enroll`: a new ONNX file with enrolled (or removed) classes that passes
onnx.checker, never touches its input, shows its log in inspect/verify, and is scored with
its new classes; and `score --centers` with a service's centers file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from center_embed.cli import main
from center_embed.runtime import OnnxModel, RuntimeOptions
from tests.helpers import ROOT, encode, tiny_images


@pytest.fixture
def zebra_folder(tmp_path: Path) -> Path:
    root = tmp_path / "new"
    for name, seed in (("zebra", 3), ("okapi", 4)):
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(tiny_images(6, seed=seed)):
            (root / name / f"{i}.png").write_bytes(encode(pixels))
    return root


def _embeddings(model_path: Path, files: list[Path]) -> np.ndarray:
    from center_embed.runtime import OnnxModel, RuntimeOptions

    model = OnnxModel(model_path, RuntimeOptions(device="cpu"))
    return model.run(np.stack([model.decode(f) for f in files]))["embeddings"].astype(np.float64)


def test_enroll_writes_a_new_checked_model(tiny_onnx, zebra_folder, tmp_path, capsys):
    import onnx

    from center_embed.fileio import sha256_file
    from center_embed.runtime import OnnxModel, RuntimeOptions

    before = sha256_file(tiny_onnx)
    out = tmp_path / "v2.onnx"
    argv = ["enroll", str(tiny_onnx), "--class", "zebra", str(zebra_folder / "zebra"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sha256_file(tiny_onnx) == before  # the input is never modified
    onnx.checker.check_model(str(out), full_check=True)
    model = OnnxModel(out, RuntimeOptions(device="cpu"))
    original = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")).info.class_names
    assert model.info.class_names == [*original, "zebra"] and model.info.num_classes == 4
    files = sorted((zebra_folder / "zebra").iterdir())
    e = _embeddings(tiny_onnx, files)
    brute_center = [sum(row[j] for row in e) / len(e) for j in range(e.shape[1])]
    proto = onnx.load(str(out))
    centers = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
                   if t.name == "centers")  # fmt: skip
    np.testing.assert_allclose(centers[3], brute_center, rtol=1e-4, atol=1e-5)
    dims = next(o for o in proto.graph.output if o.name == "distances").type.tensor_type.shape.dim
    assert dims[1].dim_value == 4
    out_of_graph = model.run(np.stack([model.decode(files[0])]))
    # A distance is ‖e − c‖²; the score (export's default) its min less ‖e‖², plus the
    # image's atypicality.
    assert model.info.unknown_score == "min_distance_minus_norm"
    brute = sum((e[0][j] - brute_center[j]) ** 2 for j in range(len(brute_center)))
    assert out_of_graph["distances"][0, 3] == pytest.approx(brute, rel=1e-3, abs=1e-3)
    if out_of_graph["labels"][0] == 3:
        score = brute - float((e[0] ** 2).sum()) + float(out_of_graph["atypicality"][0])
        assert out_of_graph["unknown_scores"][0] == pytest.approx(score, rel=1e-3, abs=1e-3)
    assert "zebra" in model.info.class_thresholds  # 6 images: its own threshold
    log = model.info.metadata["center_embed.enrolment"]
    assert '"class": "zebra"' in log and '"images": 6' in log

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "1 change since training" in shown and "enrol zebra, 6 images" in shown
    assert main(argv) == 1  # an existing --out is refused without --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_enroll_from_folder_then_remove(tiny_onnx, zebra_folder, tmp_path):
    from center_embed.runtime import OnnxModel, RuntimeOptions

    v2, v3 = tmp_path / "v2.onnx", tmp_path / "v3.onnx"
    assert main(["enroll", str(tiny_onnx), "--from-folder", str(zebra_folder),
                 "--out", str(v2)]) == 0  # fmt: skip
    names = OnnxModel(v2, RuntimeOptions(device="cpu")).info.class_names
    assert names[-2:] == ["okapi", "zebra"]
    assert main(["enroll", str(v2), "--remove", "okapi", "--remove", names[0],
                 "--out", str(v3)]) == 0  # fmt: skip
    info = OnnxModel(v3, RuntimeOptions(device="cpu")).info
    assert info.class_names == [*names[1:-2], "zebra"]
    assert set(info.class_thresholds) <= set(info.class_names)
    assert info.metadata["center_embed.enrolment"].count('"action"') == 4  # 2 enrol, 2 remove


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class", "", "{zebra}"], "the class name is empty"),
        (["--class", "a\tb", "{zebra}"], "control characters"),
        (["--class", "x", "{missing}"], "is not a folder of images"),
        (["--remove", "nope"], "no class 'nope' to remove"),
        ([], "nothing to change"),
        (["--class", "zebra", "{zebra}", "--class", "zebra", "{zebra}"], "more than once"),
    ],
)
def test_enroll_bad_input_is_one_error_line(
    tiny_onnx, zebra_folder, tmp_path, capsys, extra, message
):
    folders = {"zebra": zebra_folder / "zebra", "missing": tmp_path / "missing"}
    extra = [a.format(**folders) for a in extra]
    out = tmp_path / "v2.onnx"
    assert main(["enroll", str(tiny_onnx), *extra, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_enroll_without_onnx_names_the_extra(
    tiny_onnx, zebra_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as if not installed
    monkeypatch.delitem(sys.modules, "center_embed.export.enrolled_model", raising=False)
    out = tmp_path / "v2.onnx"
    argv = [
        "enroll",
        str(tiny_onnx),
        "--class",
        "z",
        str(zebra_folder / "zebra"),
        "--out",
        str(out),
    ]
    assert main(argv) == 1
    assert "onnx is not installed; pip install '.[enrol]'" in capsys.readouterr().err
    assert not out.exists()


def test_enroll_needs_no_torch(tiny_onnx, zebra_folder, tmp_path):
    """A serving box enrols with the `enrol` extra (onnx) and no torch at all."""
    out = tmp_path / "v2.onnx"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from center_embed.cli import main\n"
        f"sys.exit(main(['enroll', {str(tiny_onnx)!r}, '--class', 'z', "
        f"{str(zebra_folder / 'zebra')!r}, '--out', {str(out)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert OnnxModel(out, RuntimeOptions(device="cpu")).info.class_names[-1] == "z"


def test_enrolled_model_and_centers_file_are_scored_with_the_new_classes(
    tiny_onnx, zebra_folder, tmp_path
):
    """score picks up enrolled classes from a new model, or from a service's centers file;
    both give the same rows."""
    import pyarrow.parquet as pq

    from center_embed.contract import read_centers
    from center_embed.enrolment import CenterSet, CentersFile, centers_file_for
    from center_embed.fileio import sha256_file
    from center_embed.runtime import OnnxModel, RuntimeOptions

    model_path = tmp_path / "m.onnx"
    shutil.copyfile(tiny_onnx, model_path)
    model = OnnxModel(model_path, RuntimeOptions(device="cpu"))
    files = sorted((zebra_folder / "zebra").iterdir())
    e = _embeddings(model_path, files).astype(np.float32)
    base = CenterSet.from_model(model.info, read_centers(model_path), sha256_file(model_path))
    store = CentersFile(centers_file_for(model_path), sha256_file(model_path), model.info)
    store.update(base, lambda c: c.with_class("zebra", e, info=model.info, source="test"))

    v2 = tmp_path / "v2.onnx"
    assert main(["enroll", str(model_path), "--centers", str(store.path), "--out", str(v2)]) == 0
    via_file, via_model = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["score", str(model_path), str(zebra_folder), "--centers", str(store.path),
                 "--out", str(via_file), "--no-progress"]) == 0  # fmt: skip
    assert main(["score", str(v2), str(zebra_folder), "--out", str(via_model),
                 "--no-progress"]) == 0  # fmt: skip
    a, b = pq.read_table(via_file).to_pylist(), pq.read_table(via_model).to_pylist()
    assert [r["class_name"] for r in a] == [r["class_name"] for r in b]
    names = pq.read_schema(via_file).metadata[b"center_embed.class_names"].decode()
    assert names.endswith('"zebra"]')
    np.testing.assert_allclose([r["distances"] for r in a], [r["distances"] for r in b],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    assert len(a[0]["distances"]) == 4
    # the same bytes elsewhere are the same model: its centers file applies
    assert main(["score", str(tiny_onnx), str(zebra_folder), "--centers", str(store.path),
                 "--out", str(tmp_path / "c.parquet"), "--no-progress"]) == 0  # fmt: skip


def test_verify_shows_the_log_of_a_class_replaced_from_its_own_images(
    tiny_onnx, tiny_folder, tmp_path, capsys
):
    out = tmp_path / "v2.onnx"
    red = tiny_folder / "train" / "red"
    assert main(["enroll", str(tiny_onnx), "--class", "red", str(red), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--data", str(tiny_folder), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "enrol red, 64 images" in shown
    accuracy = float(shown.split("nearest-center accuracy")[1].split()[0])
    assert accuracy >= 0.9  # the class recomputed from its own training images still works


def test_enroll_a_class_of_atypical_images(tiny_onnx, tmp_path):
    """Flat greys are atypical for the tiny model: a class enrolled from them by the CLI gets
    a threshold that includes their atypicality, so the written model knows greys it was
    not enrolled from (unknown before)."""
    from center_embed.runtime import OnnxModel

    folder = tmp_path / "flat"
    folder.mkdir()
    for g in np.linspace(60, 200, 10).astype(np.uint8):
        (folder / f"{g}.png").write_bytes(encode(np.full((32, 32, 3), g, np.uint8)))
    out = tmp_path / "v2.onnx"
    assert main(["enroll", str(tiny_onnx), "--class", "flat", str(folder), "--out", str(out)]) == 0
    held_out = np.stack([np.full((32, 32, 3), g, np.uint8) for g in (95, 165)])
    original, after = OnnxModel(tiny_onnx), OnnxModel(out)
    before = original.run(held_out)
    assert (before["atypicality"] > 1).all() and original.unknown(before).all()
    got = after.run(held_out)
    assert [after.info.class_names[k] for k in got["labels"]] == ["flat", "flat"]
    assert not after.unknown(got).any()


def test_enroll_a_format_1_model_keeps_its_format(tiny_plain_onnx, zebra_folder, tmp_path):
    """A file of format 1 enrols as it declares: its squared distances, its min distance as
    the unknown score (and the enrolled class's threshold on it), four outputs kept."""
    from center_embed.runtime import OnnxModel, RuntimeOptions

    out = tmp_path / "v2.onnx"
    argv = ["enroll", str(tiny_plain_onnx), "--class", "zebra", str(zebra_folder / "zebra"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    model = OnnxModel(out, RuntimeOptions(device="cpu"))
    assert model.info.format_version == 1 and len(model.output_names) == 4
    files = sorted((zebra_folder / "zebra").iterdir())
    got = model.run(np.stack([model.decode(f) for f in files]))
    e, c = _embeddings(tiny_plain_onnx, files), model_centers(out)
    brute = ((e[:, None, :] - c[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(got["distances"], brute, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(got["unknown_scores"], got["min_distances"])
    assert model.info.class_thresholds["zebra"] > 0  # a squared distance's quantile


def model_centers(path: Path) -> np.ndarray:
    from center_embed.contract import read_centers

    return read_centers(path)
