"""Metrics against brute-force definitions on small hand-made sets."""

from __future__ import annotations

import pytest
import torch

from center_embed.metrics import intra_inter_ratio, retrieval_metrics, squared_distances
from tests.helpers import brute_force_intra_inter, brute_force_retrieval


def test_retrieval_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    y[-1] = 7  # a class with a single member is skipped as a query
    got = retrieval_metrics(x, y, chunk=7)
    p1, map_r = brute_force_retrieval(x.tolist(), y.tolist())
    assert got["precision_at_1"] == pytest.approx(p1)
    assert got["map_at_r"] == pytest.approx(map_r)


def test_squared_distances_and_ratio():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    assert squared_distances(x, c).tolist() == [[0.0, 100.0], [25.0, 25.0]]
    # Own-center distances 0 and 5 (mean 2.5); the two centers are 10 apart.
    assert intra_inter_ratio(x, torch.tensor([0, 1]), c) == pytest.approx(0.25)


def test_ratio_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(30, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.randint(0, 4, (30,), generator=g)  # class 4 absent: not in the denominator
    expected = brute_force_intra_inter(x.tolist(), y.tolist(), c.tolist())
    assert intra_inter_ratio(x, y, c) == pytest.approx(expected, rel=1e-5)
