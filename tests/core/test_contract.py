"""The contract's distance kinds, unknown scores and model formats: every reader computes
distances, scores and class centers here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from center_embed import contract
from center_embed.errors import UserError


def _props(**overrides) -> dict[str, str]:
    values = {
        "format_version": str(contract.MODEL_FORMAT_VERSION),
        "class_names": ["a", "b"],
        "embedding_dim": 4,
        "input_size": [8, 8],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "unknown_threshold": "2.0",
        "class_thresholds": {"a": 1.0},
    }
    return contract.encode_metadata(values | overrides)


@pytest.mark.parametrize("kind", sorted(contract.DISTANCE_KINDS))
def test_distances_match_a_brute_force_loop(kind):
    rng = np.random.default_rng(0)
    e, c = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    got = contract.distances(e, c, kind)
    expected = np.array([[_brute(kind, x, y) for y in c] for x in e])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The center of a class minimises its images' summed distance in that space.
    center = contract.class_center(e, kind)
    best = contract.distances(e, center[None], kind).sum()
    for nudge in rng.normal(scale=0.05, size=(20, 5)).astype(np.float32):
        assert contract.distances(e, (center + nudge)[None], kind).sum() >= best - 1e-4


def _brute(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    if kind == "squared_euclidean":
        return float(((x64 - y) ** 2).sum())
    if kind == "squared_euclidean_minus_norm":
        return float(((x64 - y) ** 2).sum() - (x64**2).sum())
    raise AssertionError(f"no brute-force definition for {kind}")


def test_minus_norm_ranks_centers_as_the_squared_distance_does():
    """Per image the two kinds differ by ‖e‖² only: same nearest center, same order."""
    rng = np.random.default_rng(3)
    e, c = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(9, 6)).astype(np.float32)
    plain = contract.distances(e, c, "squared_euclidean")
    minus = contract.distances(e, c, "squared_euclidean_minus_norm")
    np.testing.assert_allclose(plain - minus, np.repeat((e**2).sum(1, keepdims=True), 9, 1),
                               rtol=1e-5, atol=1e-4)  # fmt: skip
    assert (minus < 0).any()  # it is not a distance: it may be negative
    np.testing.assert_array_equal(np.argsort(plain, 1), np.argsort(minus, 1))


def test_unknown_kinds_and_empty_classes_are_refused():
    with pytest.raises(UserError, match="does not know"):
        contract.parse_metadata(_props(format_version="1", distance="hyperbolic"), "m.onnx")
    with pytest.raises(UserError, match="unknown_score 'entropy', which this center-embed"):
        contract.parse_metadata(_props(unknown_score="entropy"), "m.onnx")
    with pytest.raises(UserError, match="format version 3; this center-embed reads versions 1, 2"):
        contract.parse_metadata(_props(format_version="3"), "m.onnx")
    old = contract.parse_metadata(_props(format_version="1"))  # format 1 without `distance`
    assert (old.distance, old.unknown_score, old.score_kind) == (
        contract.DISTANCE,
        "min_distance",
        contract.DISTANCE,
    )
    new = contract.parse_metadata(_props())
    assert (new.format_version, new.distance, new.unknown_score, new.score_kind) == (
        2,
        "squared_euclidean",
        contract.DEFAULT_UNKNOWN_SCORE,
        "squared_euclidean_minus_norm",
    )
    with pytest.raises(ValueError, match="unknown distance kind"):
        contract.distances(np.zeros((1, 2)), np.zeros((1, 2)), "hyperbolic")
    with pytest.raises(ValueError, match="n >= 1"):
        contract.class_center(np.zeros((0, 4), np.float32))


def test_unknown_uses_the_nearest_classes_threshold():
    info = contract.parse_metadata(_props())
    # class a has its own threshold 1.0; b falls back to the global 2.0
    np.testing.assert_array_equal(info.label_thresholds(), [1.0, 2.0])
    flags = info.unknown(np.array([1.5, 1.5, 2.5, 0.5]), np.array([0, 1, 1, 0]))
    np.testing.assert_array_equal(flags, [True, False, True, False])
    none = contract.parse_metadata(_props(unknown_threshold="", class_thresholds={}))
    assert none.label_thresholds() is None and not none.unknown(np.ones(2), np.zeros(2)).any()
    assert json.loads(_props()["center_embed.class_thresholds"]) == {"a": 1.0}


def test_center_scores_format_2_distances_are_distances_and_the_score_apart():
    """Format 2: distances = ‖e − c‖² (>= 0), labels their argmin, min_distances their min,
    unknown_scores = min over centers of ‖e − c‖² − ‖e‖², plus the atypicality."""
    rng = np.random.default_rng(7)
    e, c = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    a = np.where(rng.random(40) < 0.3, rng.uniform(0, 9, 40), 0).astype(np.float32)
    out = contract.center_scores(e, c, "squared_euclidean_minus_norm", True, a)
    brute = np.array([[_brute("squared_euclidean", x, y) for y in c] for x in e])
    np.testing.assert_allclose(out["distances"], brute, rtol=1e-4, atol=1e-4)
    assert (out["distances"] >= 0).all()
    np.testing.assert_array_equal(out["labels"], brute.argmin(1))
    np.testing.assert_allclose(out["min_distances"], brute.min(1), rtol=1e-4, atol=1e-4)
    score = (brute - (e.astype(np.float64) ** 2).sum(1, keepdims=True)).min(1) + a
    np.testing.assert_allclose(out["unknown_scores"], score, rtol=1e-4, atol=1e-4)
    bare = contract.center_scores(e, c, "squared_euclidean_minus_norm", True)  # no image
    np.testing.assert_allclose(out["unknown_scores"] - bare["unknown_scores"], a, atol=1e-4)


def test_center_scores_format_1_keeps_the_declared_kind_and_scores_by_min_distance():
    rng = np.random.default_rng(8)
    e, c = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    a = rng.uniform(0, 2, 20).astype(np.float32)
    out = contract.center_scores(e, c, "squared_euclidean_minus_norm", False, a)
    declared = contract.distances(e, c, "squared_euclidean_minus_norm", atypicality=a)
    np.testing.assert_allclose(out["distances"], declared, rtol=1e-6)
    np.testing.assert_array_equal(out["unknown_scores"], out["min_distances"])
    np.testing.assert_allclose(out["min_distances"], declared.min(1), rtol=1e-6)
