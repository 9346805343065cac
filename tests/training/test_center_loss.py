"""CenterLoss against brute-force Python loops, for every update rule and both update paths
(dense for few classes, sparse for many), on one process and on two (gloo)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from center_embed.training import CenterLoss
from center_embed.training.center_loss import DENSE_MAX_CLASSES
from tests.helpers import free_port

PATHS = ["dense", "sparse"]


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


@pytest.mark.parametrize("update", ["paper", "mean"])
def test_eval_mode_does_not_move_centers(update):
    criterion = CenterLoss(4, 2, update=update).eval()
    criterion.centers.copy_(torch.tensor(C0))
    criterion(torch.tensor(X), torch.tensor(Y))
    assert criterion.centers.tolist() == C0
    assert criterion.counts.tolist() == [0.0] * 4


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


class FreshTensors(TorchDispatchMode):
    """Records the element count of every tensor an op allocates: outputs sharing no storage
    with the op's inputs. In-place writes into the centers and views are not allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.sizes.append(t.numel())
        return out


def step_allocations(num_classes: int, update: str, b: int = 8, d: int = 4) -> list[int]:
    """Element counts of the tensors one training step allocates, in order."""
    criterion = CenterLoss(num_classes, d, update=update).train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=generator)
    y = torch.randint(0, num_classes, (b,), generator=generator)
    with FreshTensors() as fresh:
        loss = criterion(x, y)
    assert torch.isfinite(loss)
    moved = (criterion.centers != 0).any(1).sum().item()
    assert moved == len(torch.unique(y))  # the batch's own centers moved, no other
    return fresh.sizes


@pytest.mark.parametrize("update", ["paper", "mean"])
def test_cost_does_not_grow_with_a_b_by_c_matrix(update):
    """A million classes: the step allocates exactly what it does for 2,048 (both on the
    sparse path), and no temporary is larger than the (B, D) batch: no B x C matrix and
    no scan of the C centers. So the step's cost does not grow with C, proven without a
    wall-clock timing (which a loaded machine turns into noise)."""
    b, d = 8, 4
    few = step_allocations(2 * DENSE_MAX_CLASSES, update, b, d)
    million = step_allocations(1_000_000, update, b, d)
    assert million == few
    assert max(million) <= b * d  # a B x C matrix would hold 8,000,000 elements


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


# --------------------------------------------------------------------------- both paths


def brute_force_run(batches, num_classes, dim, update, alpha=0.5, decay=1.0):
    """Centers and counts after the batches, by Python loops over classes and samples."""
    centers = [[0.0] * dim for _ in range(num_classes)]
    counts = [0.0] * num_classes
    sums = [[0.0] * dim for _ in range(num_classes)]
    for x, y in batches:
        for j in range(num_classes):
            members = [xi for xi, yi in zip(x, y, strict=True) if yi == j]
            n = len(members)
            if update == "paper":
                for d in range(dim):
                    delta = sum(centers[j][d] - xi[d] for xi in members) / (1 + n)
                    centers[j][d] -= alpha * delta
                counts[j] += n
            else:
                counts[j] = decay * counts[j] + n
                for d in range(dim):
                    sums[j][d] = decay * sums[j][d] + sum(xi[d] for xi in members)
                if n:  # only classes in the batch are recomputed
                    centers[j] = [s / counts[j] for s in sums[j]]
    return centers, counts


def random_batches(num_classes, dim, steps=4, batch=24, seed=0, present=None):
    """Batches with duplicated labels in each, drawn from `present` classes (default: the
    first half, so the other half stays absent throughout)."""
    g = torch.Generator().manual_seed(seed)
    present = present if present is not None else list(range(max(1, num_classes // 2)))
    batches = []
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 2 + 1
        y = torch.tensor(present)[torch.randint(0, len(present), (batch,), generator=g)]
        y[1] = y[0]  # at least one duplicate
        batches.append((x, y))
    return batches


RULES = [("paper", {"alpha": 0.5}), ("paper", {"alpha": 1.0}), ("mean", {"decay": 1.0}),
         ("mean", {"decay": 0.8})]  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("update", "options"), RULES)
def test_both_paths_match_brute_force(path, dtype, update, options):
    num_classes, dim = 9, 3
    batches = random_batches(num_classes, dim, present=[0, 2, 3, 7])
    criterion = CenterLoss(num_classes, dim, update, path=path, **options).to(dtype).train()
    for x, y in batches:
        loss = criterion(x.to(dtype), y)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    plain = [(x.tolist(), y.tolist()) for x, y in batches]
    centers, counts = brute_force_run(plain, num_classes, dim, update, **options)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    expected = torch.tensor(centers, dtype=torch.float64)
    torch.testing.assert_close(criterion.centers.double(), expected, atol=tolerance, rtol=0)
    counts_expected = torch.tensor(counts, dtype=torch.float64)
    torch.testing.assert_close(criterion.counts.double(), counts_expected, atol=0, rtol=tolerance)
    for absent in (1, 4, 5, 6, 8):  # never in a batch: untouched, and no NaN from 0 / 0
        assert criterion.centers[absent].abs().sum() == 0
        assert criterion.counts[absent] == 0


@pytest.mark.parametrize(("update", "options"), RULES)
def test_dense_and_sparse_paths_agree_bit_for_bit_on_cpu(update, options):
    num_classes, dim = 40, 6
    modules = {p: CenterLoss(num_classes, dim, update, path=p, **options).train() for p in PATHS}
    for x, y in random_batches(num_classes, dim, steps=6, batch=50, seed=3):
        losses = {p: m(x.float(), y) for p, m in modules.items()}
        assert torch.equal(losses["dense"], losses["sparse"])
    dense, sparse = modules["dense"], modules["sparse"]
    for name in ("centers", "counts", "sums"):
        assert torch.equal(getattr(dense, name), getattr(sparse, name)), name


@pytest.mark.parametrize("path", PATHS)
def test_a_class_decayed_after_being_seen_keeps_its_mean(path):
    """Mean rule with a decay: a class absent from later batches keeps S_j / N_j."""
    criterion = CenterLoss(3, 2, "mean", decay=0.5, path=path).train()
    criterion(torch.tensor([[2.0, 4.0], [4.0, 8.0]]), torch.tensor([1, 1]))
    for _ in range(30):  # N_1 shrinks towards 0; the center of class 1 must not move
        criterion(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    assert criterion.centers[1].tolist() == [3.0, 6.0]
    assert criterion.centers[0].tolist() == [1.0, 1.0]
    assert criterion.centers[2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("update", ["paper", "mean"])
def test_empty_batch_and_single_sample(path, update):
    criterion = CenterLoss(5, 2, update, path=path).train()
    loss = criterion(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0 and criterion.centers.abs().sum() == 0
    criterion(torch.tensor([[2.0, -2.0]]), torch.tensor([4]))
    # paper: c − α·(c − x)/(1 + n) with c = 0, α = 0.5, n = 1; mean: x itself
    expected = [0.5, -0.5] if update == "paper" else [2.0, -2.0]
    assert criterion.centers[4].tolist() == expected
    assert criterion.counts.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_path_choice():
    assert CenterLoss(DENSE_MAX_CLASSES, 2).path == "dense"
    assert CenterLoss(DENSE_MAX_CLASSES + 1, 2).path == "sparse"
    assert CenterLoss(10, 2, path="sparse").path == "sparse"
    assert "path='dense'" in repr(CenterLoss(10, 2))
    with pytest.raises(ValueError, match="path must be"):
        CenterLoss(10, 2, path="fast")


# --------------------------------------------------------------------------- two processes


WORLD = 2


def _run_rules(rank: int, world: int, num_classes: int, path: str) -> dict[str, torch.Tensor]:
    """Every rule over three global batches of 12, on this process's shard of each."""
    out = {}
    batches = random_batches(num_classes, 4, steps=3, batch=12, seed=5, present=[1, 3, 4, 9])
    shard = 12 // world
    for update, options in RULES:
        criterion = CenterLoss(num_classes, 4, update, path=path, **options).train()
        for x, y in batches:
            mine = slice(rank * shard, (rank + 1) * shard)
            criterion(x[mine].float(), y[mine])
        key = f"{update}-{next(iter(options.values()))}"
        out[f"{key}.centers"] = criterion.centers.clone()
        out[f"{key}.counts"] = criterion.counts.clone()
    return out


def _distributed_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for path in PATHS:
            result = _run_rules(rank, WORLD, 11, path)
            torch.save(result, Path(out) / f"{path}-{rank}.pt")
        dist.barrier()  # leave together: gloo torn down under a peer can abort it
    finally:
        dist.destroy_process_group()


def test_two_processes_update_as_one_process_on_the_global_batch(tmp_path):
    ctx = mp.spawn(_distributed_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD,
                   join=False)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("processes still running after 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    one = _run_rules(0, 1, 11, "dense")
    for path in PATHS:
        ranks = [torch.load(tmp_path / f"{path}-{r}.pt") for r in range(WORLD)]
        for key, expected in one.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{path}: ranks differ in {key}"
            torch.testing.assert_close(ranks[0][key], expected, atol=1e-6, rtol=0,
                                       msg=f"{path} {key}")  # fmt: skip
        assert ranks[0]["paper-0.5.centers"][1].abs().sum() > 0.1  # they moved
        assert ranks[0]["paper-0.5.centers"][0].abs().sum() == 0  # an absent class did not
