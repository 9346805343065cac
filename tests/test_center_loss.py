"""CenterLoss against brute-force Python loops, for every update rule."""

from __future__ import annotations

import pytest
import torch

from center_embed import CenterLoss


def brute_force_loss(x: list[list[float]], y: list[int], c: list[list[float]]) -> float:
    total = 0.0
    for xi, yi in zip(x, y, strict=True):
        total += sum((a - b) ** 2 for a, b in zip(xi, c[yi], strict=True))
    return total / (2 * len(x))


def brute_force_paper(x, y, c, alpha):
    new = [row[:] for row in c]
    for j in range(len(c)):
        members = [xi for xi, yi in zip(x, y, strict=True) if yi == j]
        for d in range(len(c[j])):
            delta = sum(c[j][d] - xi[d] for xi in members) / (1 + len(members))
            new[j][d] = c[j][d] - alpha * delta
    return new


def brute_force_mean(batches, num_classes, dim, decay):
    sums = [[0.0] * dim for _ in range(num_classes)]
    counts = [0.0] * num_classes
    centers = [[0.0] * dim for _ in range(num_classes)]
    for x, y in batches:
        for j in range(num_classes):
            members = [xi for xi, yi in zip(x, y, strict=True) if yi == j]
            counts[j] = decay * counts[j] + len(members)
            for d in range(dim):
                sums[j][d] = decay * sums[j][d] + sum(xi[d] for xi in members)
            if counts[j] > 0:
                centers[j] = [s / counts[j] for s in sums[j]]
    return centers


# Hand-made 2-D points: class 0 twice (duplicated labels), class 2 absent from the batch.
X = [[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 4.0]]
Y = [0, 0, 1, 3]
C0 = [[0.0, 1.0], [1.0, 1.0], [5.0, 5.0], [-1.0, 3.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_loss_value_matches_brute_force(dtype):
    criterion = CenterLoss(4, 2, update="paper").eval()
    criterion.centers.copy_(torch.tensor(C0))
    x = torch.tensor(X, dtype=dtype)
    loss = criterion(x, torch.tensor(Y))
    expected = brute_force_loss(x.float().tolist(), Y, C0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_eval_mode_does_not_move_centers():
    criterion = CenterLoss(4, 2, update="paper").eval()
    criterion.centers.copy_(torch.tensor(C0))
    criterion(torch.tensor(X), torch.tensor(Y))
    assert criterion.centers.tolist() == C0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.1])
def test_paper_update_matches_eq4(alpha):
    criterion = CenterLoss(4, 2, update="paper", alpha=alpha).train()
    criterion.centers.copy_(torch.tensor(C0))
    loss = criterion(torch.tensor(X), torch.tensor(Y))
    # The loss uses the centers from before the update.
    assert loss.item() == pytest.approx(brute_force_loss(X, Y, C0), rel=1e-6)
    expected = brute_force_paper(X, Y, C0, alpha)
    assert torch.allclose(criterion.centers, torch.tensor(expected), atol=1e-6)
    assert criterion.centers[2].tolist() == C0[2]  # an absent class stays put
    assert criterion.counts.tolist() == [2.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_mean_update_is_running_class_mean(decay):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randn(6, 3, generator=g)
        y = torch.randint(0, 4, (6,), generator=g)
        y[0] = y[1]  # duplicated labels in every batch
        batches.append((x.tolist(), y.tolist()))
    criterion = CenterLoss(5, 3, update="mean", decay=decay).train()  # class 4 never seen
    for x, y in batches:
        criterion(torch.tensor(x), torch.tensor(y))
    expected = brute_force_mean(batches, 5, 3, decay)
    assert torch.allclose(criterion.centers, torch.tensor(expected), atol=1e-6)
    assert criterion.centers[4].abs().sum() == 0


def test_sgd_gradients_match_brute_force():
    criterion = CenterLoss(4, 2, update="sgd").train()
    with torch.no_grad():
        criterion.centers.copy_(torch.tensor(C0))
    x = torch.tensor(X, requires_grad=True)
    loss = criterion(x, torch.tensor(Y))
    loss.backward()
    b = len(X)
    # dL/dx_i = (x_i - c_{y_i}) / B ;  dL/dc_j = -Σ_{y_i=j} (x_i - c_j) / B
    for i, (xi, yi) in enumerate(zip(X, Y, strict=True)):
        expected = [(xi[d] - C0[yi][d]) / b for d in range(2)]
        assert x.grad[i].tolist() == pytest.approx(expected, rel=1e-6)
    for j in range(4):
        expected = [
            -sum(xi[d] - C0[j][d] for xi, yi in zip(X, Y, strict=True) if yi == j) / b
            for d in range(2)
        ]
        assert criterion.centers.grad[j].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # The sgd rule leaves moving the centers to the optimizer.
    assert criterion.centers.detach().tolist() == C0


def test_paper_and_mean_send_no_gradient_to_centers():
    for update in ("paper", "mean"):
        criterion = CenterLoss(4, 2, update=update)
        assert not criterion.centers.requires_grad
        assert list(criterion.parameters()) == []


def test_cost_does_not_grow_with_a_b_by_c_matrix():
    """A million classes: the step only touches the batch's own centers (no B x C matrix)."""
    criterion = CenterLoss(1_000_000, 4, update="paper").train()
    x = torch.randn(8, 4)
    y = torch.randint(0, 1_000_000, (8,))
    loss = criterion(x, y)
    assert torch.isfinite(loss)
    moved = (criterion.centers != 0).any(1).sum().item()
    assert moved == len(torch.unique(y))


@pytest.mark.parametrize("bad", [[0, 4], [-1, 0]])
def test_labels_out_of_range_are_refused(bad):
    criterion = CenterLoss(4, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        criterion(torch.zeros(2, 2), torch.tensor(bad))


def test_shape_and_option_errors():
    criterion = CenterLoss(4, 2)
    with pytest.raises(ValueError, match="features must have shape"):
        criterion(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must have shape"):
        criterion(torch.zeros(2, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="update must be"):
        CenterLoss(4, 2, update="adam")
    with pytest.raises(ValueError, match="alpha"):
        CenterLoss(4, 2, alpha=0)
