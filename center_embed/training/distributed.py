"""torchrun support: process-group set-up, the DDP wrapper, and who writes files.

Launched by torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment), training joins
a process group: gloo on the CPU, nccl on CUDA. Each process takes its shard of every
global batch (see loader.BatchLoader), DDP averages the model's gradients, CenterLoss all-reduces
its per-class sums and counts (or, for `sgd`, its centers' gradient), and only rank 0
writes checkpoints and logs.

What is exact and what is not: the centers move exactly as one process on the global batch
would move them, and so do the weights of a network without batch statistics. BatchNorm
layers normalise each process's shard by its own statistics (as DDP always does; torch's
SyncBatchNorm has no CPU implementation), so a network with BatchNorm trains like one
process with ghost batches of batch_size / world_size images.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Context(rank, local_rank, world_size, owns_group=False)
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Context(rank, local_rank, world_size, owns_group=True)


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if ctx.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process if `flag` is true on any: a collective, so all must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: Context) -> None:
    """Wait for every process (a no-op for one)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        # DDP sits in reference cycles; one freed only at exit, after its process group,
        # can abort the interpreter ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
