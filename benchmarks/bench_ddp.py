"""Two processes against one, same global batch: what data parallelism costs on this machine.

    .venv/bin/python benchmarks/bench_ddp.py [--batch 1024] [--steps 4] [--rounds 3]

One process with every core trains on the whole global batch; two processes (gloo on
127.0.0.1, DDP, CenterLoss all-reducing its per-class sums and counts) with half the cores
each train on half of it. The step is train.py's: EmbeddingNet at the cpu preset's widths,
bf16 autocast when the CPU has it, channels_last, CE + λ·center loss, the airbench
optimiser. On a machine with two cores there is nothing to gain, so the ratio measures what
the processes and their communication cost; on a multi-GPU box the same script shows the
speed-up. Rounds alternate between the two set-ups; medians are reported.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import add_json_argument, free_port, write_results


def worker(rank: int, world: int, port: int, batch: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from center_embed.training import distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ctx = distributed.Context(rank, rank, world)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    step, model, bf16 = training_step(rank, world, batch, ctx)
    times = []
    for _ in range(2):
        step()
    for _ in range(steps):
        distributed.barrier(ctx)
        start = time.perf_counter()
        step()
        distributed.barrier(ctx)
        times.append(time.perf_counter() - start)
    # The communication alone: one all-reduce of as many floats as DDP averages per step.
    grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    comm = []
    for _ in range(steps if world > 1 else 0):
        distributed.barrier(ctx)
        start = time.perf_counter()
        dist.all_reduce(grads)
        comm.append(time.perf_counter() - start)
    if rank == 0:
        result = {"times": times, "comm": comm, "floats": grads.numel()}
        torch.save(result | {"threads": torch.get_num_threads(), "bf16": bf16}, out)
    step = model = None  # drop DDP before its process group goes
    gc.collect()  # DDP sits in reference cycles: collect them now
    if world > 1:
        dist.destroy_process_group()


def training_step(rank: int, world: int, batch: int, ctx):
    """(one train.py step on this rank's shard of the global batch, the model, bf16)."""
    import torch
    import torch.nn.functional as F

    from center_embed.training import distributed
    from center_embed.training.center_loss import CenterLoss
    from center_embed.training.config import load_config
    from center_embed.training.inference import use_bf16
    from center_embed.training.model import EmbeddingNet
    from center_embed.training.train import make_optimizer

    cfg = load_config("cpu", None, [f"train.batch_size={batch}"])
    bf16 = use_bf16(cfg.train.bf16, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=g)  # the global batch
    labels = torch.randint(0, 10, (batch,), generator=g)
    shard = slice(rank * batch // world, (rank + 1) * batch // world)
    x = images[shard].contiguous(memory_format=torch.channels_last)  # (b, 3, 32, 32)
    y = labels[shard]

    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, 10)
    model.init_whitening(images[:256])
    model = model.to(memory_format=torch.channels_last).train()
    criterion = CenterLoss(10, cfg.model.embedding_dim, cfg.loss.update).train()
    optimizer = make_optimizer(model, criterion, cfg)
    forward = distributed.wrap(model, ctx)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            e, logits = forward(x)  # (b, D), (b, C)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.2)
        loss = loss + cfg.loss.center_weight * criterion(e, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, model, bf16


def measure(world: int, batch: int, steps: int) -> dict:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.spawn(worker, args=(world, free_port(), batch, steps, out), nprocs=world, join=True)
        return torch.load(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1024, help="global batch (cpu preset: 1024)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    add_json_argument(p)
    args = p.parse_args()
    import torch  # after the arguments: --help needs no torch

    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    times: dict[int, list[float]] = {1: [], 2: []}
    comm: list[float] = []
    info = {}
    for _ in range(args.rounds):
        for world in (1, 2):
            result = measure(world, args.batch, args.steps)
            times[world] += result["times"]
            comm += result["comm"]
            info[world] = result
    one, two = statistics.median(times[1]), statistics.median(times[2])
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load_before} "
        f"before, {load} after, "
        f"global batch {args.batch}, "
        f"bf16={info[1]['bf16']}, {args.rounds} rounds x {args.steps} steps, medians"
    )
    print(f"  1 process  x {info[1]['threads']} threads  {one * 1e3:8.1f} ms/step  "
          f"{args.batch / one:7.0f} img/s")  # fmt: skip
    print(f"  2 processes x {info[2]['threads']} thread(s) {two * 1e3:8.1f} ms/step  "
          f"{args.batch / two:7.0f} img/s")  # fmt: skip
    print(f"  2 processes / 1 process step time: {two / one:.3f}  (>1 is a slowdown)")
    reduce = statistics.median(comm)
    print(
        f"  of which the gradients' all-reduce ({info[2]['floats'] * 4 / 1e6:.1f} MB, gloo): "
        f"{reduce * 1e3:.1f} ms = {reduce / two:.1%} of the 2-process step"
    )
    results = {"global_batch": args.batch, "bf16": info[1]["bf16"], "rounds": args.rounds,
               "steps": args.steps, "one_process_ms": one * 1e3, "two_processes_ms": two * 1e3,
               "threads": {w: info[w]["threads"] for w in (1, 2)}, "ratio": two / one,
               "all_reduce_ms": reduce * 1e3,
               "all_reduce_mb": info[2]["floats"] * 4 / 1e6}  # fmt: skip
    write_results("ddp", results, args.json)


if __name__ == "__main__":
    main()
