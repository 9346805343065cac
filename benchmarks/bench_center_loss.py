"""What the center loss costs: its overhead in a training step, and how it scales with classes.

    .venv/bin/python benchmarks/bench_center_loss.py [--quick]

1. Overhead: one training step of EmbeddingNet (cpu preset widths, batch 256, bf16 autocast
   when the CPU has it, channels_last; train.py's optimiser) with CE + λ·center loss, over
   the same step with CE alone. Target: ≤ 1.03.
2. Scaling: our CenterLoss step (forward, backward, center update) against the full B×C
   distance-matrix implementation most PyTorch code uses (KaiyangZhou/pytorch-center-loss:
   distmat = ‖x‖² + ‖c‖² − 2·x·cᵀ, masked by the labels, clamped, summed; its centers a
   parameter moved by SGD), at C = 10, 1,000 and 100,000, D = 512, B = 256.
   Target: ≥ 50× faster at C = 100,000.

Both sides of each ratio are timed in one run, interleaved round by round, and the median
per-step time is reported, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from _common import add_json_argument, write_results


def interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, repeats: dict[str, int] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each step, one figure per round, timed after a warm-up.

    Rounds alternate the order (A B, B A, ...) so that drift in the machine's speed falls
    on both sides alike; `repeats` calls of a step make one timing (default 1).
    """
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            n = (repeats or {}).get(name, 1)
            start = time.perf_counter()
            for _ in range(n):
                steps[name]()
            times[name].append((time.perf_counter() - start) / n)
    return times


def median(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------- 1. overhead


def overhead(batch: int, rounds: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from center_embed.training.center_loss import CenterLoss
    from center_embed.training.config import load_config
    from center_embed.training.inference import use_bf16
    from center_embed.training.model import EmbeddingNet
    from center_embed.training.train import make_optimizer

    cfg = load_config("cpu", None, [f"train.batch_size={batch}"])
    device = torch.device("cpu")
    bf16 = use_bf16(cfg.train.bf16, device)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))

    # One model and optimiser for every variant, so that only the loss differs.
    model = EmbeddingNet(cfg.model, 10)
    model.init_whitening(images)
    model = model.to(memory_format=torch.channels_last).train()
    criterion = CenterLoss(10, cfg.model.embedding_dim, cfg.loss.update).train()
    optimizer = make_optimizer(model, criterion, cfg)

    def make_step(with_center: bool) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                e, logits = model(images)  # (B, D), (B, C)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.2)
            if with_center:
                loss = loss + cfg.loss.center_weight * criterion(e, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    # "ce again" is the same step as "ce": its ratio shows the noise of the measurement.
    variants = {"ce": make_step(False), "ce+center": make_step(True), "ce again": make_step(False)}
    times = interleaved(variants, rounds)
    t, fastest = median(times), {name: min(v) for name, v in times.items()}

    # The center loss's own work in that step, timed alone: forward, update, and its
    # backward to the features (which the step adds to the CE gradient).
    e = torch.randn(batch, cfg.model.embedding_dim, dtype=torch.bfloat16 if bf16 else None)
    e.requires_grad_(True)

    def center_only() -> None:
        e.grad = None
        (cfg.loss.center_weight * criterion(e, labels)).backward()

    alone = median(interleaved({"center": center_only}, rounds, {"center": 50}))["center"]
    facts = f"widths {cfg.model.widths}, D={cfg.model.embedding_dim}, B={batch}, bf16={bf16}"
    return print_overhead(facts, t, fastest, alone)


def print_overhead(facts: str, t: dict, fastest: dict, alone: float) -> dict[str, float]:
    """Print the overhead figures (median and fastest step times); them for the file."""
    import torch

    print(f"overhead  EmbeddingNet {facts}, channels_last, {torch.get_num_threads()} threads")
    print(f"  step without center loss  {t['ce'] * 1e3:9.1f} ms")
    print(f"  step with center loss     {t['ce+center'] * 1e3:9.1f} ms")
    ratio, best = t["ce+center"] / t["ce"], fastest["ce+center"] / fastest["ce"]
    print(f"  ratio with / without      {ratio:9.3f}   (target <= 1.03; medians)")
    print(f"  ratio of the fastest      {best:9.3f}   (minimum of each)")
    print(f"  control: ce again / ce    {t['ce again'] / t['ce']:9.3f}   (the measure's noise)")
    print(
        f"  center loss alone         {alone * 1e3:9.3f} ms = {alone / t['ce']:.2%} of the step "
        f"(ratio 1 + that: {1 + alone / t['ce']:.4f})"
    )
    return {"step_ms": {k: v * 1e3 for k, v in t.items()}, "ratio": ratio,
            "ratio_of_fastest": best, "control_ratio": t["ce again"] / t["ce"],
            "center_loss_alone_ms": alone * 1e3, "target": 1.03, "setup": facts}  # fmt: skip


# --------------------------------------------------------------------------- 2. scaling


def distance_matrix_center_loss(num_classes: int, dim: int):
    """The classic implementation (KaiyangZhou/pytorch-center-loss, center_loss.py)."""
    import torch
    from torch import nn

    class DistanceMatrixCenterLoss(nn.Module):
        def __init__(self, num_classes: int, dim: int) -> None:
            super().__init__()
            self.num_classes = num_classes
            self.centers = nn.Parameter(torch.randn(num_classes, dim))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            batch = x.size(0)
            distmat = (
                x.pow(2).sum(dim=1, keepdim=True).expand(batch, self.num_classes)
                + self.centers.pow(2).sum(dim=1, keepdim=True).expand(self.num_classes, batch).t()
            )  # (B, C)
            distmat = distmat.addmm(x, self.centers.t(), beta=1, alpha=-2)
            classes = torch.arange(self.num_classes, device=x.device)
            mask = labels.unsqueeze(1).expand(batch, self.num_classes).eq(classes.expand(batch, -1))
            dist = distmat * mask.float()
            return dist.clamp(min=1e-12, max=1e12).sum() / batch

    return DistanceMatrixCenterLoss(num_classes, dim)


def scaling_steps(c: int, dim: int, batch: int) -> dict[str, Callable[[], None]]:
    import torch

    from center_embed.training.center_loss import CenterLoss

    g = torch.Generator().manual_seed(c)
    x = torch.randn(batch, dim, generator=g, requires_grad=True)  # (B, D) features
    labels = torch.randint(0, c, (batch,), generator=g)
    ours = CenterLoss(c, dim, "paper").train()
    theirs = distance_matrix_center_loss(c, dim)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.5)  # their centers' optimiser

    def ours_step() -> None:
        x.grad = None
        ours(x, labels).backward()  # the paper rule moves the centers inside forward

    def theirs_step() -> None:
        x.grad = None
        opt.zero_grad()
        theirs(x, labels).backward()
        opt.step()

    return {"ours": ours_step, "theirs": theirs_step}


def scaling(classes: list[int], dim: int, batch: int, rounds: int) -> dict[int, dict]:
    print(f"scaling  D={dim}, B={batch}; step = forward, backward, center update")
    print(f"  {'C':>8}  {'ours (paper)':>13}  {'distance matrix':>16}  {'speed-up':>9}")
    results = {}
    for c in classes:
        repeats = {"ours": 20, "theirs": max(1, min(20, 2000 // c))}
        t = median(interleaved(scaling_steps(c, dim, batch), rounds, repeats))
        print(
            f"  {c:>8,}  {t['ours'] * 1e3:10.3f} ms  {t['theirs'] * 1e3:13.3f} ms  "
            f"{t['theirs'] / t['ours']:8.1f}x"
        )
        results[c] = {"ours_ms": t["ours"] * 1e3, "theirs_ms": t["theirs"] * 1e3,
                      "speed_up": t["theirs"] / t["ours"]}  # fmt: skip
    print("  target: >= 50x at C = 100,000")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    add_json_argument(p)
    args = p.parse_args()
    import torch  # after the arguments: --help needs no torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 4 if args.quick else 20
    # Other work on the machine stalls multi-threaded kernels at every parallel region;
    # the load average says how much of it there was.
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}")
    results = {"rounds": rounds, "threads": torch.get_num_threads()}
    if not args.skip_overhead:
        results["overhead"] = overhead(args.batch, rounds)
    results["scaling"] = scaling([10, 1_000, 100_000], 512, args.batch, rounds)
    results["scaling_target"] = "speed_up >= 50 at C = 100,000"
    write_results("center-loss", results, args.json)


if __name__ == "__main__":
    main()
