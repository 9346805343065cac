"""The atypicality (export/atypicality.py): its maths against brute force on hand-made
numbers, its calibration by construction, the int8 refit, and files exported without it."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

from center_embed import contract
from center_embed.cli import main
from center_embed.errors import UserError
from center_embed.export.atypicality import (
    LAYERS,
    MIN_IMAGES,
    NORM_IMAGES,
    SHRINKAGE,
    Atypicality,
    AtypicalityOptions,
    _gaussian,
    fit_on,
    graph_statistics,
    pooled_statistics,
    write_into,
)
from center_embed.export.calibrate import calibration_set
from center_embed.export.onnx_export import export_checkpoint
from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.training.checkpoint import Checkpoint


def test_pooled_statistics_are_each_channels_mean_std_and_absolute_deviation():
    maps = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 3 + 1
    got = pooled_statistics(maps).double().numpy()
    x = maps.numpy().reshape(4, 3, -1)
    np.testing.assert_allclose(got[:, :3], x.mean(2), rtol=1e-5)
    np.testing.assert_allclose(got[:, 3:6], x.std(2), rtol=1e-5)  # population std (ddof 0)
    mad = [[np.mean([abs(v - row.mean()) for v in row]) for row in image] for image in x]
    np.testing.assert_allclose(got[:, 6:], mad, rtol=1e-5)


def test_log_distances_are_brute_force_mahalanobis():
    rng = np.random.default_rng(0)
    mix = np.array([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.3, 0.1]])
    train = rng.normal(size=(300, 3)) @ mix + [1.0, -2.0, 0.5]  # correlated, one thin axis
    mean, whitening = _gaussian(torch.from_numpy(train))
    module = Atypicality([3])
    module.mean0.copy_(mean)
    module.whitening0.copy_(whitening)
    queries = rng.normal(size=(7, 3)) * 2
    got = module.log_distances([torch.from_numpy(queries).float()])[:, 0].double().numpy()
    cov = np.cov(train, rowvar=False)
    cov += SHRINKAGE * np.trace(cov) / 3 * np.eye(3)
    expected = []
    for q in queries:  # brute force, one query at a time
        diff = q - train.mean(0)
        expected.append(math.log(diff @ np.linalg.inv(cov) @ diff + 1e-12))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_gate_counts_only_what_lies_beyond_it():
    module = Atypicality([2, 2, 2])
    module.log_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    module.log_std.copy_(torch.tensor([0.5, 1.0, 2.0]))
    module.gate.fill_(1.5)
    module.scale.fill_(4.0)
    # Statistics (means 0, whitening I) whose squared distance is e^s in each layer.
    s = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 9.0]])  # (3 images, L)
    stats = [(s[:, i : i + 1] / 2).exp() * torch.tensor([[0.6, 0.8]]) for i in range(3)]
    a = ((s - module.log_mean) / module.log_std).sum(1) / math.sqrt(3)  # (3,)
    got = module.forward_statistics(stats).numpy()
    np.testing.assert_allclose(got, (4.0 * (a - 1.5).clamp_min(0)).numpy(), rtol=1e-5)
    assert got[0] == 0.0 and got[1] > 0 and got[2] > got[1]  # 0 below the gate, then linear
    # forward() pools the feature maps it is given (2 channels: 6 statistics), at LAYERS.
    maps = [torch.randn(3, 2, 4, 4) for _ in range(max(LAYERS) + 2)]
    pooled = [pooled_statistics(maps[layer]) for layer in LAYERS]
    wide = Atypicality([6, 6, 6])
    assert torch.equal(wide(maps), wide.forward_statistics(pooled))


def fake_statistics(images: np.ndarray):
    """A deterministic statistics source: per-image pooled statistics of the pixels as
    every layer's, and the channel means as the embedding."""
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    stats = pooled_statistics(x)  # (n, 9)
    return [stats] * len(LAYERS), stats[:, :3]


def test_fit_gates_at_its_quantile_of_training_images():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (800, 8, 8, 3), dtype=np.uint8)  # training-like: noise
    min_distances = lambda e: e.sum(1)  # noqa: E731
    fitted = fit_on(fake_statistics, images, min_distances,
                    AtypicalityOptions(quantile=0.9, weight=2.0))  # fmt: skip
    facts = fitted.facts
    assert facts["norm_images"] == 160 and facts["fit_images"] == 640  # a fifth, the rest
    order = np.random.default_rng(0).permutation(800)
    norm = images[np.sort(order[:160])]
    stats, embeddings = fake_statistics(norm)
    atypicality = fitted.module.forward_statistics(stats).numpy()
    assert abs((atypicality > 0).mean() - 0.1) <= 1 / 160  # the gate: their 90% quantile
    assert float(fitted.module.scale) == pytest.approx(2.0 * np.std(min_distances(
        embeddings.numpy())), rel=1e-5)  # fmt: skip
    flat = np.full((4, 8, 8, 3), 128, np.uint8)  # no texture at all: far beyond the gate
    assert (fitted.module.forward_statistics(fake_statistics(flat)[0]) > 0).all()
    assert fit_on(fake_statistics, images[: MIN_IMAGES - 1], min_distances) is None
    with pytest.raises(UserError, match="quantile must lie in"):
        AtypicalityOptions(quantile=1.0)


def norm_images(checkpoint) -> np.ndarray:
    """The training images export's fit standardised and gated on (seed 0)."""
    train = calibration_set(Checkpoint.load(checkpoint)).train.images
    order = np.random.default_rng(0).permutation(len(train))
    return train[np.sort(order[: min(NORM_IMAGES, len(train) // 5)])]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_shipped_file_is_calibrated_on_its_own_activations(tiny_checkpoint, tmp_path,
                                                                precision):  # fmt: skip
    """int8 computes its feature maps differently; refitted on them, the file gives the
    same share of its training images an atypicality above 0 as fp32 does (1 − q). Fitted
    on fp32's statistics (the gate at 0.99), the tiny int8 model gave 17% of them one
    instead of 1%."""
    path = export_checkpoint(tiny_checkpoint, tmp_path / "m.onnx", int8=precision == "int8",
                             atypicality=AtypicalityOptions(quantile=0.9))  # fmt: skip
    model = OnnxModel(path, RuntimeOptions(device="cpu"))
    images = norm_images(tiny_checkpoint)
    share = (model.run(images)["atypicality"] > 0).mean()
    assert abs(share - 0.1) <= 1 / len(images)  # the gate: their 90% quantile
    facts = json.loads(model.info.metadata["center_embed.atypicality"])
    assert facts["quantile"] == 0.9 and facts["norm_images"] == len(images)
    assert ("fitted_on" in facts) == (precision == "int8")
    # The graph's own statistics, read back, are what its atypicality used.
    proto = onnx.load(str(path))
    stats, embeddings = graph_statistics(proto, "embeddings")(images[:5])
    assert [s.shape[1] for s in stats] == [3 * 24, 3 * 8, 3 * 16]  # tiny widths 8, 16
    np.testing.assert_allclose(embeddings.numpy(), model.run(images[:5])["embeddings"], rtol=1e-5)


def test_write_into_needs_every_initializer(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    names = {i.name for i in proto.graph.initializer}
    assert {"atypicality.gate", "atypicality.scale", "atypicality.whitening2"} <= names
    module = Atypicality([72, 24, 48])
    module.gate.fill_(123.0)
    write_into(proto, module)
    gate = next(i for i in proto.graph.initializer if i.name == "atypicality.gate")
    assert onnx.numpy_helper.to_array(gate) == np.float32(123.0)
    with pytest.raises(RuntimeError, match="lacks the initializers"):
        write_into(proto, Atypicality([72, 24, 48, 8]))  # a fourth layer it does not have


def test_export_without_atypicality_has_the_five_outputs(tiny_checkpoint, tiny_onnx, tmp_path):
    out = tmp_path / "plain.onnx"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--no-atypicality"]) == 0
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == list(contract.OUTPUT_NAMES)
    assert "center_embed.atypicality" not in {p.key for p in proto.metadata_props}
    plain, full = (
        OnnxModel(out, RuntimeOptions(device="cpu")),
        OnnxModel(tiny_onnx, RuntimeOptions(device="cpu")),
    )
    assert not plain.has_atypicality and full.has_atypicality
    h, w = plain.info.input_size
    images = np.concatenate([
        np.full((2, h, w, 3), 200, np.uint8),
        np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8),
    ])  # fmt: skip
    a, b = plain.run(images), full.run(images)
    np.testing.assert_array_equal(a["atypicality"], np.zeros(4, np.float32))  # reads as 0
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["labels"], b["labels"])  # a per-image constant
    # It is part of the unknown score, never of a distance.
    np.testing.assert_allclose(b["distances"], a["distances"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b["unknown_scores"] - a["unknown_scores"], b["atypicality"],
                               atol=1e-3)  # fmt: skip
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "x.onnx"),
                 "--atypicality-quantile", "1.5"]) == 1  # fmt: skip
