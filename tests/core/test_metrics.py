"""center_embed.metrics against brute-force definitions on small hand-made sets."""

from __future__ import annotations

import numpy as np
import pytest

from center_embed import metrics
from center_embed.contract import DISTANCE_KINDS, distances
from tests.helpers import brute_force_intra_inter, brute_force_retrieval


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    y[-1] = 7  # a class with a single member is skipped as a query
    got = metrics.retrieval_metrics(x, y, chunk=7)
    p1, map_r = brute_force_retrieval(x.tolist(), y.tolist())
    assert got["precision_at_1"] == pytest.approx(p1)
    assert got["map_at_r"] == pytest.approx(map_r)


def test_retrieval_by_hand_and_the_same_ranking_for_every_distance_kind():
    # Three points: a and b share a class (R = 1), c is alone (skipped).
    tiny = np.array([[0.0], [0.5], [0.7]], np.float32)
    got = metrics.retrieval_metrics(tiny, np.array([0, 0, 1]))
    # a's nearest is b (right), b's nearest is c (wrong): P@1 = 1/2; AP@R: 1 and 0.
    assert got == {"precision_at_1": 0.5, "map_at_r": 0.5}
    # Every kind a model may declare orders one query's neighbours as the Euclidean distance.
    rng = np.random.default_rng(3)
    e = rng.normal(size=(50, 4)).astype(np.float32)
    euclidean = np.argsort(distances(e, e, "squared_euclidean"), axis=1, kind="stable")
    for kind in DISTANCE_KINDS:
        by_kind = np.argsort(distances(e, e, kind).astype(np.float64), axis=1, kind="stable")
        assert (by_kind[:, :10] == euclidean[:, :10]).mean() > 0.99, kind


def test_retrieval_ties_go_to_the_lower_index_whatever_the_chunk():
    x = np.array([[0.0], [1.0], [-1.0], [1.0], [-1.0]], np.float32)  # 1..4 tie for 0
    y = np.array([0, 1, 0, 1, 0])
    assert metrics._smallest(np.abs(x[:1] - x.T), 5).tolist() == [[0, 1, 2, 3, 4]]
    for chunk in (1, 2, 5):
        assert metrics.retrieval_metrics(x, y, chunk=chunk) == metrics.retrieval_metrics(x, y)


def test_accuracy_and_nearest_center():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 7.0]], np.float32)
    c = np.array([[0.0, 0.0], [6.0, 8.0]], np.float32)
    assert metrics.nearest_center(x, c).tolist() == [0, 0, 1]  # (3, 4): 25 against 25+
    assert metrics.accuracy(np.array([0, 1, 1]), np.array([0, 0, 1])) == pytest.approx(2 / 3)
    assert np.isnan(metrics.accuracy(np.zeros(0), np.zeros(0)))


def test_intra_inter_ratio_by_hand_and_brute_force():
    x = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    c = np.array([[0.0, 0.0], [6.0, 8.0]], np.float32)
    # Own-center distances 0 and 5 (mean 2.5); the two centers are 10 apart.
    assert metrics.intra_inter_ratio(x, np.array([0, 1]), c) == pytest.approx(0.25)
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=(30, 3)), rng.normal(size=(5, 3))
    y = rng.integers(0, 4, 30)  # class 4 absent: not in the denominator
    expected = brute_force_intra_inter(x.tolist(), y.tolist(), c.tolist())
    assert metrics.intra_inter_ratio(x, y, c) == pytest.approx(expected, rel=1e-5)
    assert np.isnan(metrics.intra_inter_ratio(x, np.zeros(30, int), c))  # one class only


def _pairwise_auroc(known, unknown) -> float:
    wins = sum((u > k) + 0.5 * (u == k) for k in known for u in unknown)
    return wins / (len(known) * len(unknown))


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    known = rng.integers(0, 6, 40).astype(np.float32)  # many ties, across both sets
    unknown = rng.integers(2, 9, 30).astype(np.float32)
    assert metrics.auroc(known, unknown) == pytest.approx(_pairwise_auroc(known, unknown))
    assert metrics.auroc([0, 1], [2, 3]) == 1.0 and metrics.auroc([2, 3], [0, 1]) == 0.0
    assert metrics.auroc([1, 1], [1, 1]) == 0.5
    with pytest.raises(ValueError):
        metrics.auroc([], [1.0])


def test_fpr_at_tpr_counts_unknowns_under_the_known_95th_percentile():
    known = np.arange(1, 101, dtype=np.float64)  # the threshold accepting 95 of them is 95
    unknown = np.array([10.0, 95.0, 95.5, 200.0])
    assert metrics.fpr_at_tpr(known, unknown) == 0.5
    assert metrics.fpr_at_tpr(known, unknown, tpr=1.0) == 0.75


def test_flagged_shares_per_class():
    unknown = np.array([True, False, False, True, False])
    labels = np.array([0, 0, 1, 1, 1])
    correct = np.array([True, True, True, True, False])
    shares = metrics.flagged_shares(unknown, labels, correct, ["a", "b"])
    assert shares["all_images"] == 0.4 and shares["correct_images"] == 0.5
    assert shares["per_class_correct"] == {"a": 0.5, "b": 0.5}
