"""Export: one ONNX file that agrees with torch, describes itself, and fails cleanly.

References are computed independently of the exported graph: embeddings by the training
code's own `embed_images` (fp32), distances by brute force over (e − c)², the atypicality
by export/atypicality.py's torch module on the network's own feature maps (the module
itself is tested against brute force in test_atypicality.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from center_embed import __version__, contract
from center_embed.cli import main
from center_embed.data import load_dataset, load_for_classes, split_validation
from center_embed.errors import UserError
from center_embed.export.onnx_export import OPSET, export_checkpoint
from center_embed.export.verify import split_accuracy
from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.training.checkpoint import (
    Checkpoint,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from center_embed.training.config import Config
from center_embed.training.evaluate import evaluate_checkpoint
from center_embed.training.inference import embed_images
from tests.helpers import write_image_folder


@pytest.fixture(scope="module")
def int8_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx8") / "model-int8.onnx"
    return export_checkpoint(tiny_checkpoint, out, int8=True)


def splits(checkpoint: Path):
    """The run's (validation, test) splits, rebuilt as the exporter does."""
    ckpt = load_checkpoint(checkpoint)
    cfg = Config.from_dict(ckpt["config"])
    dataset = load_dataset(cfg.data.path, cfg.data.image_size)
    _, val = split_validation(dataset.train, cfg.data.val_size, cfg.data.seed)
    return val, dataset.test


def torch_outputs(checkpoint: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Brute force in torch float64: the outputs the default export (format 2) computes."""
    ckpt = load_checkpoint(checkpoint)
    model, criterion, _ = build_model(ckpt)
    pre = ckpt["preprocess"]
    e = embed_images(model, images, pre["mean"], pre["std"], torch.device("cpu")).double()
    c = criterion.centers.double()
    squared = ((e[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # (N, C), brute force
    a = torch_atypicality(checkpoint, images)  # (N,)
    score = squared - (e**2).sum(1, keepdim=True)  # the default score: minus ‖e‖²
    labels = score.argmin(1)
    return {
        "embeddings": e.numpy(),
        "distances": squared.numpy(),
        "labels": labels.numpy(),
        "min_distances": squared.gather(1, labels[:, None])[:, 0].numpy(),
        "unknown_scores": (score.min(1).values + a).numpy(),
        "atypicality": a.numpy(),
    }


def torch_atypicality(checkpoint: Path, images: np.ndarray, kind: str = "") -> torch.Tensor:
    """(N,) float64: the atypicality export fits (same images, same seed), in torch, scaled
    by the spread of the min of the per-center score `kind` (default: the default score's)."""
    from center_embed.export.atypicality import fit_atypicality
    from center_embed.export.calibrate import calibration_set

    ckpt = Checkpoint.load(checkpoint)
    model, criterion = ckpt.build_model()
    c = criterion.centers.numpy()
    kind = kind or contract.SCORE_DISTANCE_KIND[contract.DEFAULT_UNKNOWN_SCORE]
    fitted = fit_atypicality(model, calibration_set(ckpt).train.images, ckpt.preprocess,
                             lambda e: contract.distances(e, c, kind).min(1))  # fmt: skip
    mean = torch.tensor(ckpt.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(ckpt.preprocess.std).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        return fitted.module(model.feature_maps(x)).double()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- the graph


@pytest.mark.parametrize("batch", [1, 3, 17, 40])
def test_parity_with_torch(tiny_checkpoint, tiny_onnx, batch):
    _, test = splits(tiny_checkpoint)
    images = np.ascontiguousarray(test.images[:batch])
    got = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")).run(images)
    want = torch_outputs(tiny_checkpoint, images)
    assert relative(got["embeddings"], want["embeddings"]) < 1e-4
    assert relative(got["distances"], want["distances"]) < 1e-4
    np.testing.assert_array_equal(got["labels"], want["labels"])
    scale = np.abs(want["distances"]).max()
    for name in ("min_distances", "unknown_scores", "atypicality"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-4 * scale, err_msg=name)
    assert got["labels"].dtype == np.int64 and got["embeddings"].dtype == np.float32


def test_parity_of_the_atypicality_where_it_is_not_zero(tiny_checkpoint, tiny_onnx):
    """Real test images get an atypicality of about 0; flat colours and noise do not."""
    rng = np.random.default_rng(4)
    images = np.concatenate([
        np.broadcast_to(rng.integers(0, 256, (3, 1, 1, 3), dtype=np.uint8), (3, 32, 32, 3)),
        rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
    ])  # fmt: skip
    got = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")).run(images)
    want = torch_outputs(tiny_checkpoint, images)
    assert (want["atypicality"] > 1).all()
    assert relative(got["atypicality"], want["atypicality"]) < 1e-4
    assert relative(got["distances"], want["distances"]) < 1e-4  # distances never hold it
    scale = np.abs(want["distances"]).max()
    np.testing.assert_allclose(got["unknown_scores"], want["unknown_scores"], atol=1e-4 * scale)


@pytest.mark.parametrize("norm", ["batchnorm", "none"])  # rms: the tiny_checkpoint above
def test_parity_with_torch_for_each_embedding_norm(tiny_folder, tmp_path, norm):
    from center_embed.training.train import train
    from tests.helpers import tiny_config

    train(tiny_config(tiny_folder, model__embedding_norm=norm), tmp_path, log=lambda _: None)
    path = export_checkpoint(tmp_path / "best.pt", tmp_path / "m.onnx")
    _, test = splits(tmp_path / "best.pt")
    got = OnnxModel(path, RuntimeOptions(device="cpu")).run(test.images)
    want = torch_outputs(tmp_path / "best.pt", test.images)
    assert relative(got["embeddings"], want["embeddings"]) < 1e-4
    assert relative(got["distances"], want["distances"]) < 1e-4
    np.testing.assert_array_equal(got["labels"], want["labels"])


def test_dynamic_batch_and_io_contract(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    (image_input,) = proto.graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert image_input.name == contract.INPUT_NAME and dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == list(contract.ALL_OUTPUT_NAMES)
    model = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu", threads=1))
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 33):
        out = model.run(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        assert out["embeddings"].shape == (n, 16) and out["distances"].shape == (n, 3)
        assert out["labels"].shape == (n,) and out["min_distances"].shape == (n,)
        assert out["atypicality"].shape == (n,) and (out["atypicality"] >= 0).all()
        assert out["unknown_scores"].shape == (n,) and (out["distances"] >= 0).all()
        # The outputs agree with each other: nearest label and min distance of `distances`,
        # the score the min of ‖e − c‖² − ‖e‖², plus the atypicality.
        np.testing.assert_array_equal(out["labels"], out["distances"].argmin(1))
        np.testing.assert_array_equal(out["min_distances"], out["distances"].min(1))
        norms = (out["embeddings"].astype(np.float64) ** 2).sum(1)
        score = out["min_distances"] - norms + out["atypicality"]
        scale = np.abs(out["distances"]).max()
        np.testing.assert_allclose(out["unknown_scores"], score, atol=1e-4 * scale)
    empty = model.run_batched(np.zeros((0, 32, 32, 3), np.uint8))
    assert empty["distances"].shape == (0, 3) and empty["labels"].dtype == np.int64
    expected = contract.empty_outputs(3, 16)
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {
        k: (v.shape, v.dtype) for k, v in expected.items()
    }


def test_a_plain_client_finds_true_distances(tiny_onnx):
    """The contract, as a plain onnxruntime client checks it with nothing of ours:
    `distances` equal ‖e − c‖² from `embeddings` and the `centers` initializer, all >= 0,
    labels their argmin, min_distances their min."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(5).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": images}), strict=True))
    initializers = onnx.load(str(tiny_onnx)).graph.initializer
    centers = next(t for t in initializers if t.name == "centers")
    centers = onnx.numpy_helper.to_array(centers).astype(np.float64)
    e = out["embeddings"].astype(np.float64)
    brute = ((e[:, None, :] - centers[None]) ** 2).sum(-1)
    assert (out["distances"] >= 0).all()
    np.testing.assert_allclose(out["distances"], brute, rtol=1e-4, atol=1e-4 * brute.max())
    np.testing.assert_array_equal(out["labels"], brute.argmin(1))
    np.testing.assert_allclose(out["min_distances"], brute.min(1), rtol=1e-4, atol=1e-4)


def test_contract_scores_are_the_graphs(tiny_onnx):
    """The numpy formula the service uses on vectors gives the graph's own outputs."""
    model = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu", threads=1))
    images = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    out = model.run(images)
    info = model.info
    assert info.format_version == 2 and info.unknown_score == "min_distance_minus_norm"
    centers = contract.read_centers(tiny_onnx)
    ours = contract.center_scores(out["embeddings"], centers, info.score_kind, True,
                                  out["atypicality"])  # fmt: skip
    for name in ("distances", "min_distances", "unknown_scores"):
        np.testing.assert_allclose(ours[name], out[name], rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(ours["labels"], out["labels"])
    batched = contract.run_batched(model.run, images, batch_size=4)
    assert set(batched) == set(contract.ALL_OUTPUT_NAMES)
    for name in contract.ALL_OUTPUT_NAMES:
        np.testing.assert_allclose(batched[name], out[name], rtol=1e-5, atol=1e-5)


def test_the_min_distance_score_and_the_deprecated_distance_option(tiny_checkpoint, tiny_onnx,
                                                                   tmp_path):  # fmt: skip
    """--unknown-score min_distance: the same distances and labels, the score is the min
    distance plus the atypicality (scaled by the spread of its own kind), its own threshold;
    --distance is the old name of the choice."""
    path = export_checkpoint(tiny_checkpoint, tmp_path / "md.onnx", unknown_score="min_distance")
    model = OnnxModel(path, RuntimeOptions(device="cpu"))
    default = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu"))
    _, test = splits(tiny_checkpoint)
    images = np.ascontiguousarray(test.images[:20])
    got, new = model.run(images), default.run(images)
    assert model.info.unknown_score == "min_distance"
    np.testing.assert_allclose(got["distances"], new["distances"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got["labels"], new["labels"])
    own = torch_atypicality(tiny_checkpoint, images, "squared_euclidean").numpy()
    scale = np.abs(got["distances"]).max()
    np.testing.assert_allclose(got["unknown_scores"], got["min_distances"] + own,
                               atol=1e-4 * scale)  # fmt: skip
    assert model.info.unknown_threshold > 0  # calibrated on its own score
    assert model.info.unknown_threshold != default.info.unknown_threshold
    with pytest.raises(UserError, match="--unknown-score must be one of"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x.onnx", unknown_score="cosine")


def test_checkpoint_object_gives_back_the_dict_on_disk(tiny_checkpoint):
    raw = load_checkpoint(tiny_checkpoint)
    again = Checkpoint.from_dict(raw).to_dict()
    assert list(again) == list(raw)  # same keys, in the order training writes them
    for key, value in raw.items():
        if key in ("model", "center_loss", "optimizer", "ema"):  # tensors: the very objects
            assert again[key] is value, key
        else:
            assert again[key] == value, key
    loaded = Checkpoint.load(tiny_checkpoint)
    assert loaded.class_names == raw["class_names"] and loaded.config.data.val_size == 48
    assert all(torch.equal(loaded.model_state[k], v) for k, v in raw["model"].items())


def test_one_file_with_named_centers_and_pinned_opset(tiny_checkpoint, tiny_onnx):
    proto = onnx.load(str(tiny_onnx), load_external_data=False)
    assert [p.version for p in proto.opset_import if p.domain in ("", "ai.onnx")] == [OPSET]
    assert all(not i.external_data for i in proto.graph.initializer)
    assert list(tiny_onnx.parent.iterdir()) == [tiny_onnx]  # no side file, no temp left
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    _, criterion, _ = build_model(load_checkpoint(tiny_checkpoint))
    np.testing.assert_array_equal(initializers["centers"], criterion.centers.numpy())
    readers = [n.op_type for n in proto.graph.node if "centers" in n.input]
    assert readers  # the distance computation reads the named centers
    onnx.checker.check_model(proto, full_check=True)


# --------------------------------------------------------------------------- metadata


def test_metadata_round_trip(tiny_checkpoint, tiny_onnx):
    ckpt = load_checkpoint(tiny_checkpoint)
    props = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    info = contract.parse_metadata(props)
    assert info.class_names == ckpt["class_names"] == ["blue", "green", "red"]
    assert info.embedding_dim == 16 and info.input_size == (32, 32)
    assert info.mean == ckpt["preprocess"]["mean"] and info.std == ckpt["preprocess"]["std"]
    assert info.distance == "squared_euclidean" and info.precision == "fp32"
    assert info.unknown_score == "min_distance_minus_norm"
    assert props["center_embed.format_version"] == "2"
    assert props["center_embed.input_layout"] == "NHWC uint8 RGB"
    training = json.loads(props["center_embed.training"])
    assert training["update"] == "paper" and training["center_weight"] == 0.01
    assert training["alpha"] == 0.5 and training["epochs"] == ckpt["epoch"]
    val_acc = ckpt["metrics"]["val"]["nearest_center_accuracy"]
    assert training["val"]["nearest_center_accuracy"] == pytest.approx(val_acc)
    assert props["center_embed.package_version"] == __version__
    verification = json.loads(props["center_embed.verification"])
    assert verification["batch_sizes"] == [1, 3, 17] and verification["label_mismatches"] == 0


def test_threshold_matches_its_definition(tiny_checkpoint, tiny_onnx):
    """The global threshold is the 95% quantile of unknown scores of correctly classified
    validation images; each class's is the same over that class."""
    model = OnnxModel(tiny_onnx, RuntimeOptions(device="cpu"))
    val, _ = splits(tiny_checkpoint)
    out = model.run_batched(val.images)
    correct = out["labels"] == val.labels
    md = out["unknown_scores"]
    assert model.info.unknown_threshold == pytest.approx(
        np.quantile(md[correct], 0.95, method="inverted_cdf"), rel=1e-6
    )
    share_below = (md[correct] <= model.info.unknown_threshold).mean()
    assert 0.95 <= share_below < 0.95 + 2 / correct.sum()
    for j, name in enumerate(model.info.class_names):
        mine = correct & (val.labels == j)
        assert model.info.class_thresholds[name] == pytest.approx(
            np.quantile(md[mine], 0.95, method="inverted_cdf")
        )
    calibration = json.loads(model.info.metadata["center_embed.unknown_threshold_calibration"])
    assert calibration["split"] == "validation" and calibration["images"] == len(val) == 48
    assert calibration["correct"] == int(correct.sum()) and calibration["quantile"] == 0.95
    # The flag uses the threshold of the image's nearest class, not the global one.
    per_label = np.array([model.info.class_thresholds[n] for n in model.info.class_names])
    np.testing.assert_array_equal(model.unknown(out), md > per_label[out["labels"]])
    no_threshold = dataclasses.replace(model.info, unknown_threshold=None)
    assert not no_threshold.unknown(md, out["labels"]).any()


def test_quantile_and_no_silent_test_split_fallback(tiny_checkpoint, tiny_folder, tmp_path):
    """val_size 0: export refuses to calibrate on the run's test split (it is only
    measured) and names the ways out; --calibration-data's test split then calibrates."""
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["config"]["data"]["val_size"] = 0
    save_checkpoint(tmp_path / "noval.pt", ckpt)
    with pytest.raises(UserError, match=r"data\.val_size=0.*--set data\.val_size=N.*--calibration"):
        export_checkpoint(tmp_path / "noval.pt", tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists()
    # The run's own dataset, or a copy of its training images, never calibrates.
    with pytest.raises(UserError, match="is the run's own dataset"):
        export_checkpoint(
            tmp_path / "noval.pt", tmp_path / "r.onnx", calibration_data=str(tiny_folder)
        )
    copy = tmp_path / "copy"
    for split in ("train", "test"):  # the training images again, as another folder's test
        shutil.copytree(tiny_folder / "train", copy / split)
    with pytest.raises(UserError, match="are training images of the run"):
        export_checkpoint(tmp_path / "noval.pt", tmp_path / "r.onnx", calibration_data=str(copy))
    assert not (tmp_path / "r.onnx").exists()
    other = write_image_folder(tmp_path / "other", {"train": 1, "test": 12}, seed=11)
    path = export_checkpoint(
        tmp_path / "noval.pt", tmp_path / "m.onnx", quantile=0.5, calibration_data=str(other)
    )
    model = OnnxModel(path, RuntimeOptions(device="cpu"))
    calibration = json.loads(model.info.metadata["center_embed.unknown_threshold_calibration"])
    assert calibration["split"] == "test" and calibration["quantile"] == 0.5
    assert calibration["source"] == str(other) and calibration["images"] == 36
    test = load_for_classes(str(other), model.info.class_names, 32).test
    out = model.run_batched(test.images)
    correct = out["labels"] == test.labels
    expected = np.quantile(out["unknown_scores"][correct], 0.5, method="inverted_cdf")
    assert model.info.unknown_threshold == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- accuracy


def test_verify_accuracy_equals_torch_eval(tiny_checkpoint, tiny_onnx):
    onnx_result = split_accuracy(tiny_onnx)
    torch_result = evaluate_checkpoint(tiny_checkpoint, device="cpu", tta=0, bf16="off")
    assert onnx_result["images"] == torch_result["test_images"] == 48
    diff = abs(onnx_result["nearest_center_accuracy"] - torch_result["nearest_center_accuracy"])
    assert diff <= 0.001


def test_int8_agrees_with_fp32(tiny_checkpoint, tiny_onnx, int8_model):
    fp32, int8 = (
        OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")),
        OnnxModel(int8_model, RuntimeOptions(device="cpu")),
    )
    assert int8.info.precision == "int8"
    proto = onnx.load(str(int8_model))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    kinds = {i.name: i.data_type for i in proto.graph.initializer}
    assert onnx.TensorProto.INT8 in kinds.values()  # weights
    assert onnx.TensorProto.UINT8 in kinds.values()  # activation zero points
    assert kinds["centers"] == onnx.TensorProto.FLOAT
    val, test = splits(tiny_checkpoint)
    images = np.concatenate([val.images, test.images])  # 96 images
    a, b = fp32.run_batched(images), int8.run_batched(images)
    assert (a["labels"] == b["labels"]).mean() >= 0.99

    def from_centers(out):  # the distances without the atypicality
        return out["distances"] - out["atypicality"][:, None]

    assert relative(from_centers(b), from_centers(a)) < 0.25
    loss = json.loads(int8.info.metadata["center_embed.precision_loss"])
    assert loss["split"] == "validation" and loss["images"] == 48
    assert loss["accuracy_drop_points"] == pytest.approx(
        100 * (loss["nearest_center_accuracy_fp32"] - loss["nearest_center_accuracy"])
    )


def test_fp16_outputs_stay_float32(tiny_checkpoint, tiny_onnx, tmp_path):
    path = export_checkpoint(tiny_checkpoint, tmp_path / "m16.onnx", fp16=True)
    fp16, fp32 = (
        OnnxModel(path, RuntimeOptions(device="cpu")),
        OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")),
    )
    assert fp16.info.precision == "fp16"
    kinds = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds.values()
    assert kinds["centers"] == onnx.TensorProto.FLOAT
    _, test = splits(tiny_checkpoint)
    a, b = fp32.run_batched(test.images), fp16.run_batched(test.images)
    assert b["embeddings"].dtype == b["distances"].dtype == np.float32
    assert relative(b["distances"], a["distances"]) < 2e-2
    assert (a["labels"] == b["labels"]).mean() >= 0.99
    loss = json.loads(fp16.info.metadata["center_embed.precision_loss"])
    assert loss["label_agreement_with_fp32"] >= 0.99


# --------------------------------------------------------------------------- the CLI


def test_cli_export_inspect_verify(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert "labels differ" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blue, green, red" in printed and "unknown above" in printed
    assert main(["inspect", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["class_names"] == ["blue", "green", "red"] and meta["embedding_dim"] == 16
    report = tmp_path / "verify.json"
    args = ["verify", str(out), "--checkpoint", str(tiny_checkpoint), "--json", str(report)]
    assert main(args) == 0
    figures = json.loads(report.read_text())
    assert abs(figures["difference_points"]) <= 0.1 and figures["images"] == 48


# --------------------------------------------------------------------------- bad input


def only_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_missing_corrupt_and_foreign_checkpoints(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(out)]) == 1
    assert "not found" in only_error_line(capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    assert main(["export", str(corrupt), "--out", str(out)]) == 1
    assert "not a readable checkpoint" in only_error_line(capsys)
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["format_version"] = 99
    save_checkpoint(tmp_path / "v99.pt", ckpt)
    assert main(["export", str(tmp_path / "v99.pt"), "--out", str(out)]) == 1
    assert "format version 99" in only_error_line(capsys)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_unwritable_output(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["export", str(tiny_checkpoint), "--out", str(blocker / "m.onnx")]) == 1
    assert "cannot create" in only_error_line(capsys)
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path)]) == 1
    assert "is a folder" in only_error_line(capsys)


def test_failure_leaves_no_partial_file(tiny_checkpoint, tmp_path, monkeypatch):
    import center_embed.export.onnx_export as onnx_export

    def broken(*args, **kwargs):
        raise UserError("simulated verification failure")

    monkeypatch.setattr(onnx_export, "check_parity", broken)
    with pytest.raises(UserError, match="simulated"):
        export_checkpoint(tiny_checkpoint, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_our_metadata(tmp_path, capsys):
    node = onnx.helper.make_node("Identity", ["images"], ["embeddings"])
    graph = onnx.helper.make_graph(
        [node],
        "foreign",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("embeddings", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    for command in ("inspect", "verify"):
        assert main([command, str(path)]) == 1
        assert "no center_embed metadata" in only_error_line(capsys)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["inspect", str(tmp_path / "junk.onnx")]) == 1
    assert "not a readable ONNX model" in only_error_line(capsys)


def test_calibration_data_with_other_classes(tiny_checkpoint, tmp_path, capsys):
    other = write_image_folder(tmp_path / "other", {"train": 2, "test": 2}, ["cat", "dog", "red"])
    out = tmp_path / "m.onnx"
    args = ["export", str(tiny_checkpoint), "--out", str(out), "--calibration-data", str(other)]
    assert main(args) == 1
    assert "lacks the model's classes ['blue', 'green']" in only_error_line(capsys)
    assert not out.exists()


def test_calibration_data_with_an_extra_class(tiny_checkpoint, tiny_folder, tmp_path):
    """A dataset holding the model's classes and more: its classes sort as blue, extra,
    green, red, and are relabelled to the model's order before calibrating."""
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    for split in ("train", "test"):
        shutil.copytree(tiny_folder / split / "red", other / split / "extra")
    path = export_checkpoint(tiny_checkpoint, tmp_path / "m.onnx", calibration_data=str(other))
    model = OnnxModel(path, RuntimeOptions(device="cpu"))
    calibration = json.loads(model.info.metadata["center_embed.unknown_threshold_calibration"])
    assert calibration["split"] == "test" and calibration["images"] == 48
    assert calibration["source"] == str(other)
    assert calibration["correct"] >= 45  # labels line up with the model's classes


def test_inspect_and_verify_need_no_torch(tiny_onnx):
    """Serving machines run inspect and verify without torch installed."""
    code = (
        "import sys; from center_embed.cli import main; "
        f"assert main(['inspect', {str(tiny_onnx)!r}]) == 0; "
        f"assert main(['verify', {str(tiny_onnx)!r}]) == 0; "
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_inspect_shows_the_int8_accuracy_drop_and_counts_in_words(int8_model, capsys):
    assert main(["inspect", str(int8_model)]) == 0
    printed = capsys.readouterr().out
    assert "int8 vs fp32" in printed and "drop " in printed and " points" in printed
    assert "3 classes" in printed and " kB)" in printed


def test_sizes_and_plurals_read_as_words():
    from center_embed.cli.export import format_size, plural

    assert [format_size(n) for n in (812, 45_300, 1_200_000)] == ["812 B", "45.3 kB", "1.2 MB"]
    assert [plural(1, "class"), plural(3, "class"), plural(2, "image")] == [
        "1 class",
        "3 classes",
        "2 images",
    ]
