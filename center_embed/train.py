"""The training loop: cross-entropy + λ·center loss, airbench-style optimisation.

Read top to bottom: the optimiser and its schedules, the lookahead EMA, then `train`
itself. Device, precision and embedding helpers live in inference.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from center_embed import __version__, distributed
from center_embed.center_loss import CenterLoss
from center_embed.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from center_embed.config import Config
from center_embed.data import (
    channel_stats,
    load_dataset,
    select_classes,
    split_validation,
    spread_sample,
)
from center_embed.errors import UserError
from center_embed.inference import resolve_device, split_metrics, use_bf16, use_channels_last
from center_embed.loader import BatchLoader
from center_embed.model import EmbeddingNet

# --------------------------------------------------------------------------- optimiser


def make_optimizer(model: EmbeddingNet, criterion: CenterLoss, cfg: Config) -> torch.optim.SGD:
    """Nesterov SGD in airbench's decoupled parametrisation, for a mean (not summed) loss.

    Param groups: BatchNorm biases (lr × bias_scaler), the whitening bias (frozen after
    `whiten_bias_epochs` by zeroing its lr), everything else, and the centers for `sgd`.
    Each group keeps its `base_lr`; the schedule multiplies it.
    """
    t = cfg.train
    # Nesterov steps are ~(1 + 1/(1-momentum)) gradients long; divide that out.
    kilostep_scale = 1024 * (1 + 1 / (1 - t.momentum))
    lr = t.lr / kilostep_scale * t.batch_size  # × batch size: our loss is a mean
    wd = t.weight_decay * t.batch_size / kilostep_scale  # the product lr·decay per step
    norm_biases, whiten_bias, others = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "whiten.bias":
            whiten_bias.append(p)
        elif "norm" in name:
            norm_biases.append(p)
        else:
            others.append(p)
    lr_bias = lr * t.bias_scaler
    groups = [
        dict(params=norm_biases, base_lr=lr_bias, weight_decay=wd / lr_bias, name="norm_bias"),
        dict(params=whiten_bias, base_lr=lr_bias, weight_decay=wd / lr_bias, name="whiten_bias"),
        dict(params=others, base_lr=lr, weight_decay=wd / lr, name="weights"),
    ]
    if criterion.update == "sgd":
        groups.append(
            dict(
                params=[criterion.centers],
                base_lr=cfg.loss.center_lr,
                weight_decay=0.0,
                name="centers",
            )  # fmt: skip
        )
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=True)


def lr_factor(step: int, total_steps: int, cfg: Config) -> float:
    """Linear warm-up from 0.2 to 1 over `warmup_frac` of the steps, then down to final."""
    warmup = int(total_steps * cfg.train.warmup_frac)
    if step < warmup:
        frac = step / warmup
        return 0.2 * (1 - frac) + frac
    frac = (step - warmup) / max(total_steps - warmup, 1)
    return (1 - frac) + cfg.train.final_lr_frac * frac


def center_weight_at(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """λ rises linearly from λ/warmup_steps to λ over the warm-up, then stays."""
    warmup = max(1, round(cfg.loss.center_weight_warmup_epochs * steps_per_epoch))
    return cfg.loss.center_weight * min(1.0, (step + 1) / warmup)


class Lookahead:
    """hlb/airbench lookahead: every few steps the weights move to an EMA of themselves."""

    def __init__(self, model: torch.nn.Module, total_steps: int) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.total_steps = total_steps

    def decay(self, step: int) -> float:
        return 0.95**5 * (step / self.total_steps) ** 3

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for (_, ema), param in zip(self.state.items(), model.state_dict().values(), strict=True):
            if param.dtype.is_floating_point:
                ema.lerp_(param, 1 - decay)
                param.copy_(ema)


# --------------------------------------------------------------------------- training


class TrainingInterrupted(UserError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume."""


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, writing last.pt, best.pt and metrics.jsonl under out_dir. Returns the
    final validation metrics. Under torchrun every process calls this; rank 0 writes."""
    ctx = distributed.setup(cfg.train.device)
    if not ctx.is_main:
        log = _silent
    try:
        return _train(cfg, Path(out_dir), resume, log, ctx)
    finally:  # also on an error or an interruption, so the process group never leaks
        distributed.teardown(ctx)


def _train(
    cfg: Config,
    out: Path,
    resume: bool,
    log: Callable[[str], None],
    ctx: distributed.Context,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    resumed = None
    if resume:
        resumed = load_checkpoint(out / "last.pt")
        if resumed["config"] != cfg.to_dict():
            # The run's own config wins: a resumed run is the same run (threads and
            # precision included, which is why this comes first).
            cfg = Config.from_dict(resumed["config"])
            log(f"resuming with the config stored in {out / 'last.pt'}")
    elif (out / "last.pt").exists():  # every rank checks, so none waits for a failed one
        raise UserError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )

    device = resolve_device(cfg.train.device, ctx.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    bf16 = use_bf16(cfg.train.bf16, device)
    channels_last = use_channels_last(cfg.train.channels_last, device)

    # ---- data: decoded once (cached), held on the device as uint8
    dataset = select_classes(
        load_dataset(cfg.data.path, cfg.data.image_size, cfg.data.cache_dir), cfg.data.classes
    )
    train_split, val_split = split_validation(dataset.train, cfg.data.val_size, cfg.data.seed)
    mean, std = channel_stats(train_split.images)
    size = cfg.data.image_size
    preprocess = {
        "input_size": [size, size],
        "mean": mean,
        "std": std,
        "layout": "NHWC uint8 RGB",
        "resize": "shorter side to input size (bilinear), centre crop",
    }
    num_classes = len(dataset.class_names)
    images = torch.from_numpy(np.ascontiguousarray(train_split.images)).to(device)
    labels = torch.from_numpy(train_split.labels).to(device)
    loader = BatchLoader(
        images, labels, cfg.train.batch_size, mean, std, cfg.data.flip, cfg.data.translate,
        cfg.train.seed, ctx.rank, ctx.world_size,
    )  # fmt: skip
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {len(labels)} training images"
        )
    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)

    # ---- model, loss, optimiser
    model = EmbeddingNet(cfg.model, num_classes).to(device)
    whitening_sample = torch.from_numpy(spread_sample(len(images), 5000)).to(device)
    model.init_whitening(loader.normalize(images[whitening_sample]))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = CenterLoss(
        num_classes, cfg.model.embedding_dim, cfg.loss.update, cfg.loss.alpha, cfg.loss.decay
    ).to(device)
    optimizer = make_optimizer(model, criterion, cfg)
    lookahead = Lookahead(model, total_steps) if cfg.train.ema_every else None
    step, history, best = 0, [], -1.0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        criterion.load_state_dict(resumed["center_loss"])
        optimizer.load_state_dict(resumed["optimizer"])
        if lookahead is not None and resumed.get("ema") is not None:
            lookahead.state = {k: v.to(device) for k, v in resumed["ema"].items()}
        step = resumed["step"]
        history = resumed["metrics"].get("history", [])
        best = resumed["metrics"].get("best_val_nearest_center_accuracy", -1.0)
        log(f"resumed {out / 'last.pt'} at step {step}/{total_steps}")
    forward = distributed.wrap(model, ctx)

    def checkpoint(metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "config": cfg.to_dict(),
            "class_names": list(dataset.class_names),
            "preprocess": preprocess,
            "embedding_dim": cfg.model.embedding_dim,
            "model": model.state_dict(),
            "center_loss": criterion.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": None if lookahead is None else lookahead.state,
            "epoch": step / steps_per_epoch,
            "step": step,
            "metrics": metrics,
            "data_source": dataset.source,
        }

    def metrics_so_far(val: dict[str, float] | None = None) -> dict[str, Any]:
        return {
            "val": val or (history[-1].get("val", {}) if history else {}),
            "history": history,
            "best_val_nearest_center_accuracy": best,
            "train_seconds": time.perf_counter() - t0,
        }

    def interrupt() -> None:
        if ctx.is_main:
            save_checkpoint(out / "last.pt", checkpoint(metrics_so_far()))
        distributed.barrier(ctx)  # nobody exits (and has torchrun stop rank 0) before it saved
        launcher = "center-embed" if ctx.world_size == 1 else "torchrun ... -m center_embed.cli"
        raise TrainingInterrupted(
            f"interrupted at step {step}/{total_steps}; saved {out / 'last.pt'}. "
            f"Continue with: {launcher} train --resume {out}"
        )

    # ---- the loop
    stop = _StopFlag()
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    with stop.installed():
        while step < total_steps:
            if distributed.any_rank(stop.requested, device):  # between epochs
                interrupt()
            epoch = step // steps_per_epoch
            for g in optimizer.param_groups:
                if g["name"] == "whiten_bias" and epoch >= cfg.train.whiten_bias_epochs:
                    g["base_lr"] = 0.0
            model.train()
            criterion.train()
            epoch_start = time.perf_counter()
            sums = torch.zeros(3, device=device)  # ce, center, count
            bar = _progress(cfg, ctx, epoch, steps_per_epoch, step % steps_per_epoch)
            for x, y in loader.epoch(epoch, start_step=step % steps_per_epoch):
                factor = lr_factor(step, total_steps, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                lam = center_weight_at(step, steps_per_epoch, cfg)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    e, logits = forward(x)  # (b, D), (b, C)
                ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.loss.label_smoothing)
                center = criterion(e, y)  # updates paper/mean centers after the loss
                loss = ce + lam * center
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if criterion.update == "sgd" and criterion.centers.grad is not None and lam > 0:
                    criterion.centers.grad.div_(lam)  # the centers' step is not scaled by λ
                    criterion.all_reduce_grad()
                optimizer.step()
                step += 1
                if lookahead is not None and step % cfg.train.ema_every == 0:
                    lookahead.update(model, lookahead.decay(step))
                sums += torch.stack([ce.detach(), center.detach(), torch.ones((), device=device)])
                bad_loss |= ~torch.isfinite(loss.detach())
                if bar is not None and step % 10 == 0:
                    _show(bar, sums, x.shape[0] * ctx.world_size, epoch_start, 10)
                if device.type == "cpu" or step % 50 == 0:  # a host sync: rare on GPU
                    _check_finite(bad_loss, step, epoch, out)
                if step >= total_steps or step % steps_per_epoch == 0:
                    break  # an epoch's last step stops after the epoch's validation
                # Processes agree on the step they stop at; on a GPU only every 50 steps,
                # as a collective is a host sync.
                agree = ctx.world_size == 1 or device.type == "cpu" or step % 50 == 0
                if agree and distributed.any_rank(stop.requested, device):
                    interrupt()
            if bar is not None:
                bar.close()
            _check_finite(bad_loss, step, epoch, out)
            if step >= total_steps and lookahead is not None:
                lookahead.update(model, 1.0)  # finish on the averaged weights

            # ---- end of epoch (or of training): validate, log, checkpoint
            last = step >= total_steps
            if not (last or (epoch + 1) % cfg.train.eval_every == 0):
                continue
            n = float(sums[2].clamp_min(1))
            record: dict[str, Any] = {
                "epoch": round(step / steps_per_epoch, 4),
                "step": step,
                "train_ce": float(sums[0]) / n,
                "train_center": float(sums[1]) / n,
                "center_weight": center_weight_at(step - 1, steps_per_epoch, cfg),
                "images_per_second": float(sums[2])
                * cfg.train.batch_size
                / (time.perf_counter() - epoch_start),
                "elapsed_seconds": time.perf_counter() - t0,
            }
            if len(val_split) and ctx.is_main:  # the others would only repeat it
                record["val"], _ = split_metrics(
                    model, criterion.centers, val_split, preprocess, device, bf16
                )
            history.append(record)
            if ctx.is_main:
                _log_epoch(record, out, log)
                val_acc = record.get("val", {}).get("nearest_center_accuracy", float(step))
                save_checkpoint(out / "last.pt", checkpoint(metrics_so_far(record.get("val"))))
                if val_acc >= best:
                    best = val_acc
                    shutil.copyfile(out / "last.pt", out / ".best.pt.tmp")
                    (out / ".best.pt.tmp").replace(out / "best.pt")
    final = metrics_so_far()
    if ctx.is_main:  # last.pt also records the final best, so a finished run says what it did
        save_checkpoint(out / "last.pt", checkpoint(final))
    # Leave together: tearing gloo down while a peer still uses it can abort the process.
    distributed.barrier(ctx)
    return final


def _silent(message: str) -> None:
    pass


def _check_finite(bad: torch.Tensor, step: int, epoch: int, out: Path) -> None:
    if distributed.any_rank(bool(bad), bad.device):  # all processes stop together
        raise UserError(
            f"the loss became NaN or infinite by step {step} (epoch {epoch + 1}); stopped. "
            f"The last good checkpoint, if any, is {out / 'last.pt'}. "
            "Lower train.lr or loss.center_weight."
        )


def _progress(cfg: Config, ctx: distributed.Context, epoch: int, total: int, done: int):
    if not (cfg.train.progress and ctx.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}", unit="step", leave=False)


def _show(bar, sums: torch.Tensor, batch: int, start: float, n: int) -> None:
    count = float(sums[2].clamp_min(1))
    seconds = time.perf_counter() - start
    bar.set_postfix(
        ce=f"{float(sums[0]) / count:.3f}",
        center=f"{float(sums[1]) / count:.3f}",
        img_s=f"{count * batch / max(seconds, 1e-9):.0f}",
    )
    bar.update(n)


def _log_epoch(record: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    val = record.get("val", {})
    parts = [
        f"epoch {record['epoch']:.2f}",
        f"ce {record['train_ce']:.3f}",
        f"center {record['train_center']:.3f}",
        f"{record['images_per_second']:.0f} img/s",
    ]
    if val:
        parts += [
            f"val softmax {val['softmax_accuracy']:.4f}",
            f"nearest-center {val['nearest_center_accuracy']:.4f}",
            f"intra/inter {val['intra_inter_ratio']:.3f}",
        ]
    log("  ".join(parts))


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: signals stay as they were
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
