"""Several processes (gloo on 127.0.0.1): the same centers as one process on the global batch.

Each test starts two processes with torch.multiprocessing (or torchrun) and bounds them
with a timeout; the processes write what they computed to files that the test compares.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from center_embed.errors import UserError
from center_embed.training import distributed
from center_embed.training.center_loss import CenterLoss
from center_embed.training.checkpoint import load_checkpoint
from tests.helpers import ROOT, free_port, tiny_config

WORLD = 2
RULES = {"paper": dict(alpha=0.5), "mean": dict(decay=0.9), "sgd": {}}
B, C, D, STEPS = 12, 5, 4, 3  # global batch, classes, embedding dim, optimizer steps


def spawn(fn, *args, timeout: float = 120) -> None:
    """Run fn(rank, port, *args) in WORLD processes; fail (and kill them) past `timeout`."""
    ctx = mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"processes still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def leave_group() -> None:
    # Wait for the other process first: tearing gloo down while a peer still talks to it
    # can abort the process ("terminate called without an active exception").
    dist.barrier()
    gc.collect()  # free DDP (it sits in reference cycles) before its process group
    dist.destroy_process_group()


def join_group(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


# --------------------------------------------------------------------------- one step, exact


class Net(nn.Module):
    """A network without batch statistics, so DDP is exact for its weights too."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return e, self.head(e)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(B, 6, generator=g)  # (B, 6)
        y = torch.randint(0, C - 1, (B,), generator=g)  # class C-1 never appears
        batches.append((x, y))
    return batches


def train_steps(update: str, ctx: distributed.Context) -> dict[str, torch.Tensor]:
    """The step of train.train on this process's shard: CE + λ·center, DDP, centers."""
    torch.manual_seed(1)
    model, criterion = Net(), CenterLoss(C, D, update, **RULES[update])
    params = list(model.parameters())
    if update == "sgd":
        params.append(criterion.centers)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    forward = distributed.wrap(model, ctx)
    lam, shard, losses = 0.5, B // ctx.world_size, []
    for x, y in global_batches():
        mine = slice(ctx.rank * shard, (ctx.rank + 1) * shard)
        e, logits = forward(x[mine])
        center = criterion(e, y[mine])
        loss = F.cross_entropy(logits, y[mine]) + lam * center
        optimizer.zero_grad()
        loss.backward()
        if update == "sgd":
            criterion.centers.grad.div_(lam)
            criterion.all_reduce_grad()
        optimizer.step()
        losses.append(center.detach())
    state = {f"center_loss.{k}": v.detach().clone() for k, v in criterion.state_dict().items()}
    state |= {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    return state | {"center_losses": torch.stack(losses)}


def _steps_worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    ctx = distributed.Context(rank, rank, WORLD)
    for update in RULES:
        torch.save(train_steps(update, ctx), Path(out) / f"{update}-{rank}.pt")
    leave_group()


def test_two_processes_move_centers_as_one_process_on_the_global_batch(tmp_path):
    spawn(_steps_worker, str(tmp_path))
    for update in RULES:
        one = train_steps(update, distributed.Context())  # one process, whole batches
        ranks = [torch.load(tmp_path / f"{update}-{r}.pt") for r in range(WORLD)]
        for key, expected in one.items():
            if key == "center_losses":  # each process's loss is its shard's; the mean is ours
                got = (ranks[0][key] + ranks[1][key]) / 2
            else:
                got = ranks[0][key]
                assert torch.equal(ranks[1][key], got), f"{update}: ranks differ in {key}"
            assert got.shape == expected.shape, key
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=f"{update} {key}")
        centers = one["center_loss.centers"]
        assert centers[: C - 1].abs().sum() > 0.1  # the centers really moved...
        if update != "sgd":
            assert torch.equal(centers[C - 1], torch.zeros(D))  # ...except the absent class's
            assert torch.equal(one["center_loss.counts"][C - 1], torch.tensor(0.0))


# --------------------------------------------------------------------------- train(), 2 ranks


def _train_worker(rank: int, port: int, data: str, out: str) -> None:
    """Runs in one process group: straight, interrupted (signal on rank 1 only), resumed,
    and one whose loss is NaN on rank 1 only. Records each rank's final parameters and
    centers, who saved what, and the messages."""
    from center_embed.training import train as train_module
    from center_embed.training.train import TrainingInterrupted, train

    join_group(rank, port)
    out_dir, cfg = Path(out), tiny_config(Path(data))
    captured: dict = {"saves": 0}
    real_wrap, real_save = distributed.wrap, train_module.save_checkpoint
    real_weight = train_module.center_weight_at

    class Recording(CenterLoss):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            captured["criterion"] = self

    def wrap(model, ctx):
        captured["model"] = model
        return real_wrap(model, ctx)

    def save(*args, **kwargs):
        captured["saves"] += 1
        return real_save(*args, **kwargs)

    def weight(step: int, *args) -> float:
        if rank == 1 and step == 5 and not captured.get("signalled"):
            captured["signalled"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return real_weight(step, *args)

    train_module.CenterLoss, train_module.save_checkpoint = Recording, save
    distributed.wrap = wrap
    record = {}
    for run in ("straight", "interrupted", "resumed"):
        train_module.center_weight_at = weight if run == "interrupted" else real_weight
        try:
            train(cfg, out_dir / ("straight" if run == "straight" else "run"), run == "resumed")
        except TrainingInterrupted as e:
            record[f"{run}.message"] = str(e)
        model, criterion = captured["model"], captured["criterion"]
        record[f"{run}.params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        record[f"{run}.centers"] = criterion.centers.detach().clone()
        record[f"{run}.saves"] = captured["saves"]
        captured["saves"] = 0
    # A loss that is NaN on one process only: both stop at the same step, with the message.
    real_ce = train_module.F.cross_entropy

    def ce(*args, **kwargs):
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if rank == 1 else loss

    train_module.F = SimpleNamespace(**{**vars(F), "cross_entropy": ce})
    try:
        train(cfg, out_dir / "nan")
    except UserError as e:
        record["nan.message"] = str(e)
    torch.save(record, out_dir / f"rank{rank}.pt")
    leave_group()


def test_train_on_two_processes_agrees_and_only_rank_0_writes(tiny_folder, tmp_path):
    spawn(_train_worker, str(tiny_folder), str(tmp_path), timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for run in ("straight", "resumed"):
        # DDP keeps the weights, and the all-reduce keeps the centers, equal on every rank.
        assert torch.equal(r0[f"{run}.centers"], r1[f"{run}.centers"]), run
        for name, p in r0[f"{run}.params"].items():
            assert torch.equal(p, r1[f"{run}.params"][name]), f"{run} {name}"
        assert r1[f"{run}.saves"] == 0 and r0[f"{run}.saves"] >= 3  # rank 0 writes alone
    # The signal reached rank 1 only; both stopped at the same step.
    assert r0["interrupted.message"] == r1["interrupted.message"]
    assert "interrupted at step 6/12" in r0["interrupted.message"]
    assert r1["interrupted.saves"] == 0 and r0["interrupted.saves"] == 2  # epoch 1, then stop

    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    assert torch.equal(straight["center_loss"]["centers"], r0["straight.centers"])
    for key in ("model", "center_loss", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    for run in ("straight", "run"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3  # one per epoch: rank 1 logged nothing
    assert straight["metrics"]["val"]["nearest_center_accuracy"] >= 0.9
    assert r0["nan.message"] == r1["nan.message"]
    assert "NaN or infinite by step 1 " in r0["nan.message"]
    assert not (tmp_path / "nan" / "last.pt").exists()


# --------------------------------------------------------------------------- torchrun


@pytest.mark.skipif(shutil.which("torchrun", path=Path(sys.executable).parent) is None,
                    reason="torchrun is not installed beside this Python")  # fmt: skip
def test_torchrun_command_line(tiny_folder, tmp_path):
    torchrun = shutil.which("torchrun", path=Path(sys.executable).parent)
    out = tmp_path / "run"
    result = subprocess.run(
        [
            torchrun, "--nproc-per-node", "2", "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "center_embed.cli", "train", "--preset", "tiny", "--data", str(tiny_folder),
            "--out", str(out), "--set", "data.val_size=48", "--set", "train.batch_size=32",
            "--set", "train.epochs=3", "--set", "train.device=cpu",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1  # rank 0 reports; rank 1 is silent
    assert result.stdout.count("nearest-center accuracy") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["metrics"]["test"]["nearest_center_accuracy"] >= 0.9
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "eval.json",
        "last.pt",
        "metrics.jsonl",
    ]
