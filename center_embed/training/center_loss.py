"""Center loss (Wen et al., ECCV 2016) with three ways to move the centers.

Features x_i (B, D), labels y_i, centers c_j (C, D):

    L_C = 1/(2B) · Σ_i ‖x_i − c_{y_i}‖²

Update rules (`update=`), applied after the loss is computed with the pre-update centers,
from detached fp32 features (fp64 for a module made .double()), whenever the module is in
training mode:

    paper: Δc_j = Σ_{y_i=j} (c_j − x_i) / (1 + n_j);   c_j ← c_j − α·Δc_j        (eq. 4)
    mean:  S_j ← m·S_j + Σ_{y_i=j} x_i;  N_j ← m·N_j + n_j;  c_j = S_j / N_j    (running mean)
    sgd:   c is an nn.Parameter moved by the optimizer at its own learning rate.

Cost per step. The loss is a gather of each sample's own center: O(B·D), never a B×C
distance matrix. The paper and mean updates take one of two paths, both with tensor shapes
fixed by B, C and D alone, so that on CUDA a step never waits for the device (no
`nonzero`, `unique` or `.item()`):

    dense   (C ≤ DENSE_MAX_CLASSES = 1024): per-class counts (C,) and sums (C, D) by
            index_add, then every center is updated elementwise; absent classes get an
            exact zero change. O(B·D + C·D).
    sparse  (larger C): the B labels are sorted and cut into groups of equal labels
            (at most B of them), group sums (B, D) and counts (B,) by index_add, and the
            ≤ B present centers are changed by index_add_ of a delta that is exactly zero
            for the unused group rows. O(B·D + B·log B); the C centers are never scanned,
            so a million classes cost what ten do.

The mean rule with a decay below 1 also scales all C sums and counts (O(C·D)) on either
path. Both paths give the same centers (bit for bit on the CPU), so the threshold is only a
matter of speed: the dense path's C·D memory traffic against the sparse path's sort and
extra small kernels. Measured on a 2-core CPU at D = 128 the two cost the same near C = B
(0.7-0.8 ms at B = C = 1024), dense is 1.3x faster at C = 10 and sparse 2-5x faster at
C = 4096. On a GPU (benchmarks/bench_gpu.py times both; not measured yet) the dense path
moves 0.5 MB at C = 1024, D = 128, and kernel launches, which favour it, should dominate.

Under torch.distributed the update equals one process's on the global batch. Dense: the
(C, D+1) sums and counts are all-reduced (SUM), one collective. Sparse: the labels are
all-gathered (W·B integers; every process must pass the same batch size B), every process
forms the same groups over the global batch, and the (W·B, D) group sums are all-reduced,
so the traffic per step grows with the world size W. For `sgd`, call `all_reduce_grad()`
after backward (the centers are not inside DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# Up to this many classes the dense update (O(C·D) per step) is used; above it, the sparse
# one (see the module docstring for the measurements behind the figure).
DENSE_MAX_CLASSES = 1024


class CenterLoss(nn.Module):
    centers: torch.Tensor  # (C, D) float32
    counts: torch.Tensor  # (C,) float32: N_j of the mean rule, images seen per class otherwise
    sums: torch.Tensor  # (C, D) float32: S_j of the mean rule (empty for the other rules)

    def __init__(
        self,
        num_classes: int,
        dim: int,
        update: str = "paper",
        alpha: float = 0.5,
        decay: float = 1.0,
        path: str = "auto",
    ) -> None:
        super().__init__()
        if update not in ("paper", "mean", "sgd"):
            raise ValueError(f"update must be 'paper', 'mean' or 'sgd', not {update!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], not {decay}")
        if num_classes < 1 or dim < 1:
            raise ValueError("num_classes and dim must be positive")
        if path not in ("auto", "dense", "sparse"):
            raise ValueError(f"path must be 'auto', 'dense' or 'sparse', not {path!r}")
        self.num_classes, self.dim = num_classes, dim
        self.update, self.alpha, self.decay = update, alpha, decay
        if path == "auto":
            path = "dense" if num_classes <= DENSE_MAX_CLASSES else "sparse"
        self.path = path

        centers = torch.zeros(num_classes, dim)
        if update == "sgd":
            # Random start so that the optimizer's first steps separate the classes.
            self.centers = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        else:
            self.register_buffer("centers", centers)
        self.register_buffer("counts", torch.zeros(num_classes))
        sums = torch.zeros(num_classes, dim) if update == "mean" else torch.zeros(0)
        self.register_buffer("sums", sums)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, update={self.update!r}, "
            f"alpha={self.alpha}, decay={self.decay}, path={self.path!r}"
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (B, {self.dim}), got {tuple(features.shape)}"
            )
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}"
            )
        self._check_labels(labels)
        labels = labels.long()
        # (B, D): the loss is fp32 whatever autocast did upstream (fp64 for fp64 centers)
        x = features.to(torch.promote_types(self.centers.dtype, torch.float32))
        own = self.centers.index_select(0, labels)  # (B, D)
        loss = (x - own).pow(2).sum() / (2 * max(x.shape[0], 1))
        if self.training and self.update != "sgd":
            self._update_centers(x.detach(), labels)
        return loss

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() == 0:
            return
        if labels.dtype.is_floating_point:
            raise ValueError("labels must be an integer tensor")
        in_range = (labels.min() >= 0) & (labels.max() < self.num_classes)
        if labels.is_cuda:
            # No host sync in the training step: the check fails asynchronously.
            torch._assert_async(in_range, "CenterLoss: label out of range")
        elif not bool(in_range):
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}], got values in [{lo}, {hi}]"
            )

    # ----------------------------------------------------------------------- updates

    @torch.no_grad()
    def _update_centers(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.path == "dense":
            self._update_dense(x, labels, distributed)
        elif labels.numel() or distributed:  # every process joins the collectives
            self._update_sparse(x, labels, distributed)

    def _update_dense(self, x: torch.Tensor, labels: torch.Tensor, distributed: bool) -> None:
        # One (C, D+1) buffer: per-class sums S_j, then the counts n_j in the last column.
        stats = x.new_zeros(self.num_classes, self.dim + 1)
        stats.index_add_(0, labels, torch.cat([x, torch.ones_like(x[:, :1])], 1))
        if distributed:
            dist.all_reduce(stats)
        batch_sums, n = stats[:, :-1], stats[:, -1:]  # (C, D), (C, 1)
        if self.update == "paper":
            # Σ_{y_i=j}(c_j − x_i) = n_j·c_j − S_j; an absent class has Δ = 0 exactly.
            delta = (n * self.centers - batch_sums) / (1 + n)
            self.centers.sub_(self.alpha * delta)
            self.counts.add_(n[:, 0])
        else:
            self._decay()
            self.sums.add_(batch_sums)
            self.counts.add_(n[:, 0])
            # Only classes in the batch are recomputed; the others keep S_j / N_j as stored.
            present = n > 0  # (C, 1)
            denominator = torch.where(present, self.counts[:, None], 1.0)
            self.centers.copy_(torch.where(present, self.sums / denominator, self.centers))

    def _update_sparse(self, x: torch.Tensor, labels: torch.Tensor, distributed: bool) -> None:
        b, first = len(labels), 0  # this process's samples are global rows first..first+b-1
        if distributed:
            # Every process sorts the same global labels, so all form the same groups; each
            # adds its own samples' features into the global group rows, then they sum up.
            gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, labels)
            first = dist.get_rank() * b
            labels = torch.cat(gathered)  # (G,), G = W·B
        g = len(labels)
        sorted_labels, order = labels.sort(stable=True)  # (G,)
        starts = torch.ones_like(sorted_labels, dtype=torch.bool)
        starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
        group_sorted = starts.cumsum(0) - 1  # (G,) group of each sorted sample, 0..K-1
        group = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)  # (G,)
        # The class of each group row. Rows K..G-1 are unused: they point at the smallest
        # label (a present class) and carry a zero count, sum and delta.
        group_class = sorted_labels[:1].expand(g).clone()
        group_class.scatter_(0, group_sorted, sorted_labels)  # duplicates write equal values
        group_counts = torch.zeros(g, dtype=x.dtype, device=x.device)
        group_counts.index_add_(0, group_sorted, torch.ones_like(group_counts))  # (G,) n_j
        group_sums = x.new_zeros(g, self.dim).index_add_(0, group.narrow(0, first, b), x)
        if distributed:
            dist.all_reduce(group_sums)  # (G, D) S_j over the global batch
        n = group_counts[:, None]  # (G, 1)
        used = n > 0
        if self.update == "paper":
            c = self.centers.index_select(0, group_class)  # (G, D)
            delta = (n * c - group_sums) / (1 + n)  # exactly 0 on unused rows
            self.centers.index_add_(0, group_class, -self.alpha * delta)
            self.counts.index_add_(0, group_class, group_counts)
        else:
            self._decay()
            self.sums.index_add_(0, group_class, group_sums)  # unused rows add zeros
            self.counts.index_add_(0, group_class, group_counts)
            denominator = torch.where(used, self.counts.index_select(0, group_class)[:, None], 1)
            means = torch.where(used, self.sums.index_select(0, group_class) / denominator, 0.0)
            # c_j = S_j / N_j exactly: zero the present centers (every row of a duplicated
            # index writes the same 0), then add each class's mean once and zeros otherwise.
            self.centers.index_fill_(0, group_class, 0.0)
            self.centers.index_add_(0, group_class, means)

    def _decay(self) -> None:
        if self.decay != 1:  # O(C·D), and only with a decay; S_j / N_j is unchanged by it
            self.sums.mul_(self.decay)
            self.counts.mul_(self.decay)

    @torch.no_grad()
    def all_reduce_grad(self) -> None:
        """Average the `sgd` centers' gradient over processes, as DDP does for the model."""
        if self.update != "sgd" or self.centers.grad is None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.centers.grad)
            self.centers.grad.div_(dist.get_world_size())
