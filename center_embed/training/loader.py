"""Training batches from a uint8 dataset held on the training device.

airbench's lesson: it is faster to keep the whole set as uint8 on the device and augment
whole batches with tensor ops than to run per-image Python in the hot loop. The random
choices are still drawn on the CPU, from generators keyed by (seed, epoch, step), so a
batch is the same on every device and after every resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from center_embed.errors import UserError


class BatchLoader:
    """Batches from a uint8 dataset held on the training device, augmented as tensor ops.

    Every random choice comes from a generator seeded by (seed, epoch, step), so an epoch
    is reproducible from its number alone: resuming mid-run replays it exactly, and every
    process of a distributed run draws the same global batch, then keeps its own shard.
    """

    def __init__(
        self,
        images: torch.Tensor,  # (N, H, W, 3) uint8 on the device
        labels: torch.Tensor,  # (N,) int64 on the device
        batch_size: int,
        mean: list[float],
        std: list[float],
        flip: bool = False,
        translate: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.images, self.labels = images, labels
        self.batch_size, self.flip, self.translate, self.seed = batch_size, flip, translate, seed
        self.rank, self.world_size = rank, world_size
        device = images.device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size  # drop the last partial batch

    def _generator(self, *key: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(hashlib.sha256(repr((self.seed, *key)).encode()).hexdigest()[:15], 16))
        return g

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (b, 3, H, W) float normalised, labels (b,)) for this process."""
        order = self._to_device(torch.randperm(len(self.labels), generator=self._generator(epoch)))
        shard = self.batch_size // self.world_size
        for step in range(start_step, len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            rows, cols = self._augment_grid(len(index), self._generator(epoch, step))
            mine = slice(self.rank * shard, (self.rank + 1) * shard)
            index, rows, cols = index[mine], rows[mine], cols[mine]
            pixels = self.images[index[:, None, None], rows[:, :, None], cols[:, None, :]]
            yield self.normalize(pixels), self.labels[index]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W), channels_last in memory already."""
        return (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std

    def _augment_grid(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image row and column indices doing a reflect-padded random crop and flip."""
        h, w = self.images.shape[1:3]
        rows = torch.arange(h).expand(n, h)
        cols = torch.arange(w).expand(n, w)
        t = self.translate
        if t > 0:
            shifts = torch.randint(-t, t + 1, (n, 2), generator=g)
            rows = _reflect(rows + shifts[:, :1], h)
            cols = _reflect(cols + shifts[:, 1:], w)
        if self.flip:
            flip = torch.rand(n, generator=g) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        grid = self._to_device(torch.cat([rows, cols], 1))  # one copy: (n, h + w)
        return grid[:, :h], grid[:, h:]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host to device without a host sync: a plain .to("cuda") from pageable memory
        waits for the GPU to finish its queue, which would stall every step. A pinned
        buffer copies asynchronously (torch keeps it alive until the copy is done)."""
        device = self.images.device
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect indices in [-size+1, 2*size-2] as F.pad(mode='reflect') does."""
    return (size - 1) - ((size - 1) - index.abs()).abs()
