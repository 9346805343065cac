"""Center loss (Wen et al., ECCV 2016) with three ways to move the centers.

Features x_i (B, D), labels y_i, centers c_j (C, D):

    L_C = 1/(2B) · Σ_i ‖x_i − c_{y_i}‖²

Update rules (`update=`), applied after the loss is computed with the pre-update centers,
from detached fp32 features, whenever the module is in training mode:

    paper: Δc_j = Σ_{y_i=j} (c_j − x_i) / (1 + n_j);   c_j ← c_j − α·Δc_j        (eq. 4)
    mean:  S_j ← m·S_j + Σ_{y_i=j} x_i;  N_j ← m·N_j + n_j;  c_j = S_j / N_j    (running mean)
    sgd:   c is an nn.Parameter moved by the optimizer at its own learning rate.

Every step costs O(B·D): a gather of each sample's own center and a scatter-add of the
per-class sums of the K ≤ B classes in the batch (plus an O(C) count vector; the mean rule
with a decay below 1 also scales all C sums). No B×C distance matrix and no C×D temporary
is ever formed, so a million classes cost what ten do.

Under torch.distributed the per-class sums and counts are all-reduced (SUM) before the
update, so N processes move the centers exactly as one process on the global batch does.
For `sgd`, call `all_reduce_grad()` after backward (the centers are not inside DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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
        self.num_classes, self.dim = num_classes, dim
        self.update, self.alpha, self.decay = update, alpha, decay

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
            f"alpha={self.alpha}, decay={self.decay}"
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
        x = features.float()  # (B, D): the loss is fp32 whatever autocast did upstream
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

    @torch.no_grad()
    def _update_centers(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        # Only the K ≤ B classes present in the (global) batch are touched, so the work is
        # O(C) for the count vector plus O(B·D), never O(C·D).
        ones = torch.ones_like(x[:, 0])  # (B,)
        batch_counts = torch.zeros_like(self.counts).index_add_(0, labels, ones)  # (C,) n_j
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(batch_counts)  # first, so every process knows the same classes
        present = batch_counts.nonzero().squeeze(1)  # (K,) sorted class ids; a host sync
        rows = torch.searchsorted(present, labels)  # (B,) each sample's row in `present`
        batch_sums = x.new_zeros(len(present), self.dim).index_add_(0, rows, x)  # (K, D) S_j
        if distributed:
            dist.all_reduce(batch_sums)
        n = batch_counts.index_select(0, present)[:, None]  # (K, 1)
        if self.update == "paper":
            # Σ_{y_i=j}(c_j − x_i) = n_j·c_j − S_j; absent classes have Δ = 0 and stay put.
            c = self.centers.index_select(0, present)  # (K, D)
            delta = (n * c - batch_sums) / (1 + n)
            self.centers.index_copy_(0, present, c - self.alpha * delta)
            self.counts.add_(batch_counts)
        else:  # mean; an absent class keeps S_j / N_j, which the decay does not change
            if self.decay != 1:  # the one O(C·D) operation, and only with a decay
                self.sums.mul_(self.decay)
                self.counts.mul_(self.decay)
            self.sums.index_add_(0, present, batch_sums)
            self.counts.add_(batch_counts)
            means = (
                self.sums.index_select(0, present) / self.counts.index_select(0, present)[:, None]
            )
            self.centers.index_copy_(0, present, means)

    @torch.no_grad()
    def all_reduce_grad(self) -> None:
        """Average the `sgd` centers' gradient over processes, as DDP does for the model."""
        if self.update != "sgd" or self.centers.grad is None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.centers.grad)
            self.centers.grad.div_(dist.get_world_size())
