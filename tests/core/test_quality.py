"""The detection and retrieval measures of center_embed.quality against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from center_embed import quality
from center_embed.metrics import retrieval_metrics as torch_retrieval


def _pairwise_auroc(known, unknown) -> float:
    wins = sum((u > k) + 0.5 * (u == k) for k in known for u in unknown)
    return wins / (len(known) * len(unknown))


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    known = rng.integers(0, 6, 40).astype(np.float32)  # many ties, across both sets
    unknown = rng.integers(2, 9, 30).astype(np.float32)
    assert quality.auroc(known, unknown) == pytest.approx(_pairwise_auroc(known, unknown))
    assert quality.auroc([0, 1], [2, 3]) == 1.0 and quality.auroc([2, 3], [0, 1]) == 0.0
    assert quality.auroc([1, 1], [1, 1]) == 0.5
    with pytest.raises(ValueError):
        quality.auroc([], [1.0])


def test_fpr_at_tpr_counts_unknowns_under_the_known_95th_percentile():
    known = np.arange(1, 101, dtype=np.float64)  # the threshold accepting 95 of them is 95
    unknown = np.array([10.0, 95.0, 95.5, 200.0])
    assert quality.fpr_at_tpr(known, unknown) == 0.5
    assert quality.fpr_at_tpr(known, unknown, tpr=1.0) == 0.75


def test_retrieval_agrees_with_the_torch_implementation_and_by_hand():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    e = (rng.normal(size=(300, 8)) + 2 * np.eye(8)[labels]).astype(np.float32)
    ours = quality.retrieval_metrics(e, labels, chunk=64)
    theirs = torch_retrieval(torch.from_numpy(e), torch.from_numpy(labels))
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"])
    assert ours["map_at_r"] == pytest.approx(theirs["map_at_r"], abs=1e-6)
    # Three points: a and b share a class (R = 1), c is alone (skipped).
    tiny = np.array([[0.0], [0.5], [0.7]], np.float32)
    got = quality.retrieval_metrics(tiny, np.array([0, 0, 1]))
    # a's nearest is b (right), b's nearest is c (wrong): P@1 = 1/2; AP@R: 1 and 0.
    assert got == {"precision_at_1": 0.5, "map_at_r": 0.5}


def test_flagged_shares_per_class():
    unknown = np.array([True, False, False, True, False])
    labels = np.array([0, 0, 1, 1, 1])
    correct = np.array([True, True, True, True, False])
    shares = quality.flagged_shares(unknown, labels, correct, ["a", "b"])
    assert shares["all_images"] == 0.4 and shares["correct_images"] == 0.5
    assert shares["per_class_correct"] == {"a": 0.5, "b": 0.5}


def test_far_ood_sets_are_images_unlike_the_known_ones():
    rng = np.random.default_rng(2)
    known = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    sets = quality.far_ood_sets(known, n=12, seed=0)
    assert set(sets) == {"uniform_noise", "gaussian_noise", "constant_colour", "blurred",
                         "inverted", "glyphs", "shapes"}  # fmt: skip
    for name, images in sets.items():
        assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8, name
    assert (sets["constant_colour"].std(axis=(1, 2)) == 0).all()
    glyphs = sets["glyphs"]
    assert (glyphs[..., 0] == glyphs[..., 2]).all() and glyphs.max() >= 160  # gray, drawn
    blocks = sets["blurred"].reshape(12, 4, 8, 4, 8, 3)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant 8x8 blocks
    assert np.array_equal(quality.far_ood_sets(known, 12, 0)["shapes"], sets["shapes"])
    gray = quality.shifted_sets(known, n=5)["grayscale"]
    assert gray.shape == (5, 32, 32, 3) and (gray[..., 0] == gray[..., 1]).all()
