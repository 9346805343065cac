"""The evaluation report: its files, and metrics equal to brute-force references (Python
loops over the model's outputs), never to the functions the report itself calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from center_embed.cli import main
from center_embed.contract import read_centers
from center_embed.data import load_dataset
from center_embed.errors import UserError
from center_embed.report.build import (
    PLOTS,
    build_report,
    confusion_matrix,
    embedding_metrics,
    read_run,
)
from center_embed.report.plots import project_2d
from center_embed.runtime import OnnxModel, describe
from tests.helpers import (
    brute_force_intra_inter,
    brute_force_retrieval,
    tiny_config,
    write_image_folder,
)


@pytest.fixture()
def run_folder(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's folder, with the eval.json `center-embed train` writes."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_checkpoint.parent / "metrics.jsonl", run / "metrics.jsonl")
    evaluation = {
        "softmax_accuracy": 0.8125,
        "nearest_center_accuracy": 0.875,
        "data": "tiny",
        "tta": {"level": 2, "softmax_accuracy": 0.9},
    }
    (run / "eval.json").write_text(json.dumps(evaluation))
    return run


def test_report_files_and_metrics_equal_brute_force(
    tiny_onnx, tiny_checkpoint, tiny_folder, run_folder, tmp_path
):
    out = tmp_path / "report"
    assert (
        main(
            [
                "report",
                str(tiny_onnx),
                "--data",
                str(tiny_folder),
                "--run",
                str(run_folder),
                "--out",
                str(out),
                "--batch-size",
                "7",
            ]
        )
        == 0
    )
    for name in ["metrics.json", "index.html", *PLOTS.values()]:
        assert (out / name).is_file(), name
    for name in PLOTS.values():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 400

    # Directly: the model over the test split in one batch, and brute-force loops.
    report = json.loads((out / "metrics.json").read_text())
    model = OnnxModel(tiny_onnx)
    test = load_dataset(tiny_folder).test
    result = model.run(np.asarray(test.images))
    labels = np.asarray(test.labels)
    centers = torch.load(tiny_checkpoint, weights_only=True)["center_loss"]["centers"].float()
    assert torch.allclose(torch.from_numpy(read_centers(tiny_onnx)), centers)
    m = report["onnx"]
    assert report["data"]["images"] == len(labels) == 48
    assert m["nearest_center_accuracy"] == pytest.approx(np.mean(result["labels"] == labels))
    for j, name in enumerate(model.info.class_names):
        mine = labels == j
        assert m["per_class_accuracy"][name] == pytest.approx(np.mean(result["labels"][mine] == j))
    points, truth = result["embeddings"].tolist(), labels.tolist()
    p1, map_r = brute_force_retrieval(points, truth)
    assert m["precision_at_1"] == pytest.approx(p1, abs=1e-6)
    assert m["map_at_r"] == pytest.approx(map_r, abs=1e-6)
    ratio = brute_force_intra_inter(points, truth, centers.tolist())
    assert m["intra_inter_ratio"] == pytest.approx(ratio, rel=1e-5)
    per_class = np.array([model.info.class_thresholds[n] for n in model.info.class_names])
    unknown = result["unknown_scores"] > per_class[result["labels"]]  # its nearest class's
    assert m["unknown_rate"] == pytest.approx(unknown.mean())
    assert np.array(m["confusion_matrix"]).sum() == 48
    assert np.trace(m["confusion_matrix"]) == np.sum(result["labels"] == labels)

    # Softmax accuracy is copied from the run, and says so.
    soft = report["softmax"]
    assert soft["softmax_accuracy"] == 0.8125 and soft["tta_softmax_accuracy"] == 0.9
    assert "eval.json" in soft["source"]
    assert report["epochs_in_run"] == 3 and "training_curves" in report["plots"]

    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "softmax accuracy" in page and "0.8125" in page and "eval.json" in page
    assert f"{m['nearest_center_accuracy']:.4f}" in page
    for name in model.info.class_names:
        assert f"<td>{name}</td>" in page


def test_report_without_a_run(tiny_onnx, tiny_folder, tmp_path):
    report = build_report(tiny_onnx, tmp_path / "r", str(tiny_folder), max_points=20)
    assert set(report["plots"]) == {"embedding_2d", "confusion", "unknown_score_hist"}
    assert not (tmp_path / "r" / "training_curves.png").exists()
    page = (tmp_path / "r" / "index.html").read_text()
    # train() alone records no test figures, so neither a run nor the model has softmax.
    assert "softmax_accuracy" not in describe(OnnxModel(tiny_onnx).info)["training"]["test"]
    assert report["softmax"] is None
    assert "softmax accuracy" in page and "not available" in page


def test_report_needs_the_model_classes(tiny_onnx, tmp_path):
    other = write_image_folder(tmp_path / "d", {"train": 2, "test": 2}, ["cyan", "magenta"])
    with pytest.raises(UserError, match="lacks the model's classes"):
        build_report(tiny_onnx, tmp_path / "r", str(other))
    with pytest.raises(UserError, match="run folder not found"):
        build_report(tiny_onnx, tmp_path / "r", str(other), tmp_path / "no-run")


def test_projection_is_identity_in_2d_and_pca_otherwise():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(200, 2)).astype(np.float32)
    points, centers, *_ = project_2d(flat, flat[:3])
    np.testing.assert_array_equal(points, flat)
    np.testing.assert_array_equal(centers, flat[:3])
    # 5-d points spread along two known directions: PCA recovers their plane.
    basis = np.linalg.qr(rng.normal(size=(5, 2)))[0]  # (5, 2) orthonormal
    coords = rng.normal(size=(500, 2)) * [5.0, 2.0]
    x = coords @ basis.T + 0.01 * rng.normal(size=(500, 5))
    points, centers, xlabel, _, what = project_2d(x, x[:4])
    assert "PCA" in what and "variance" in xlabel
    np.testing.assert_allclose(centers, points[:4], atol=1e-9)
    assert np.var(points[:, 0]) == pytest.approx(np.var(coords[:, 0]), rel=0.05)
    assert np.var(points[:, 1]) == pytest.approx(np.var(coords[:, 1]), rel=0.05)


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(1)
    truth, predicted = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    expected = np.zeros((4, 4), int)
    for t, p in zip(truth, predicted, strict=True):
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(truth, predicted, 4), expected)


def test_embedding_metrics_match_hand_computed_figures():
    """Six 2-D points, two classes, centers at (0, 0) and (4, 0); the figures by hand."""
    embeddings = np.array([[0, 0], [1, 0], [0, 1], [4, 0], [3, 0], [2.4, 0]], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 0])
    predicted = np.array([0, 0, 0, 1, 1, 1])  # the last point sits nearer center 1
    unknown = np.array([False, False, True, False, False, True])
    centers = np.array([[0, 0], [4, 0]], np.float32)
    outputs = {"labels": predicted, "embeddings": embeddings}
    m = embedding_metrics(outputs, labels, centers, ["a", "b"], unknown)
    assert m["nearest_center_accuracy"] == pytest.approx(5 / 6)
    assert m["per_class_accuracy"] == {"a": pytest.approx(3 / 4), "b": 1.0}
    # Nearest other point: 0->1 (or 2), 1->0, 2->0, 3->4, then 4->5 (0.6) and 5->4 (0.6),
    # both of the other class: precision@1 = 4/6.
    assert m["precision_at_1"] == pytest.approx(4 / 6)
    # AP@R with R = 3 for class a and R = 1 for class b. Points 0, 1, 2 find the other
    # three a-points first (5 lies 2.4, 1.4 and 2.6 away; 4 lies 3, 2 and 3.2): AP = 1.
    # Point 3: 4 first, AP = 1; point 4: 5 first, AP = 0. Point 5 ranks 4(b), 1(a), 3(b):
    # one hit, at rank 2, AP = (1/2) / 3.
    ap = [1.0, 1.0, 1.0, 1.0, 0.0, 1 / 6]
    assert m["map_at_r"] == pytest.approx(sum(ap) / 6)
    # Own-center distances 0, 1, 1, 0, 1, 2.4 (mean 5.4/6 = 0.9); the centers are 4 apart.
    assert m["intra_inter_ratio"] == pytest.approx(0.9 / 4)
    assert m["unknown_rate"] == pytest.approx(2 / 6)
    assert m["unknown_rate_correct"] == pytest.approx(1 / 5)
    assert m["unknown_rate_wrong"] == 1.0
    assert m["accuracy_on_known"] == 1.0


def test_read_run_keeps_the_last_record_of_a_repeated_epoch(tmp_path):
    lines = [
        {"epoch": 1.0, "train_ce": 2.0},
        {"epoch": 2.0, "train_ce": 1.5},
        {"epoch": 2.0, "train_ce": 1.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    evaluation, records = read_run(tmp_path)
    assert evaluation is None and [r["train_ce"] for r in records] == [2.0, 1.4]
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1"):
        read_run(tmp_path)


def test_a_2d_model_is_drawn_without_projection(tiny_folder, tmp_path, monkeypatch):
    from center_embed.export.onnx_export import export_checkpoint
    from center_embed.report import plots as report_plots
    from center_embed.training.train import train

    cfg = tiny_config(tiny_folder, model__embedding_dim="2", train__epochs="1")
    train(cfg, tmp_path / "run", log=lambda _: None)
    model = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "plot2d.onnx")
    drawn = {}
    real = report_plots.plot_embedding_2d

    def spy(points, centers, labels, class_names, xlabel, ylabel, title, path):
        drawn.update(points=points, centers=centers, xlabel=xlabel, title=title)
        real(points, centers, labels, class_names, xlabel, ylabel, title, path)

    monkeypatch.setattr(report_plots, "plot_embedding_2d", spy)
    build_report(model, tmp_path / "r", str(tiny_folder), tmp_path / "run")
    embeddings = OnnxModel(model).run(np.asarray(load_dataset(tiny_folder).test.images))
    np.testing.assert_array_equal(drawn["points"], embeddings["embeddings"])
    np.testing.assert_array_equal(drawn["centers"], read_centers(model))
    assert drawn["xlabel"] == "embedding dimension 1" and "2-D embedding" in drawn["title"]
