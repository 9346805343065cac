"""The training loop: cross-entropy + λ·center loss, airbench-style optimisation.

Read top to bottom: the optimiser and its schedules, the lookahead EMA, the state of a run
and its set-up, one optimiser step, one epoch of steps, the end of an epoch (validate, log,
checkpoint), then `train`, which strings them together. Device, precision and embedding
helpers live in inference.py; the on-device batch loader in loader.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from center_embed import __version__
from center_embed.data import (
    Split,
    channel_stats,
    describe_skipped,
    load_dataset,
    select_classes,
    split_validation,
    spread_sample,
)
from center_embed.errors import Interrupted, UserError
from center_embed.fileio import atomic_copy
from center_embed.training import distributed
from center_embed.training.center_loss import CenterLoss
from center_embed.training.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    Preprocess,
    load_checkpoint,
    save_checkpoint,
)
from center_embed.training.config import PRESET_MAX_TRAIN_IMAGES, Config, DataConfig
from center_embed.training.inference import (
    resolve_device,
    split_metrics,
    use_bf16,
    use_channels_last,
)
from center_embed.training.loader import BatchLoader
from center_embed.training.model import EmbeddingNet

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
    """hlb/airbench lookahead: every `every` steps the weights move to an EMA of themselves."""

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.total_steps, self.every = total_steps, every

    def decay(self, step: int) -> float:
        # 0.95 per step, compounded over the steps between updates (airbench: 0.95**5 every
        # 5 steps), and ramped in as (progress)³ so the early, fast-moving weights lead.
        return 0.95**self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for (_, ema), param in zip(self.state.items(), model.state_dict().values(), strict=True):
            if param.dtype.is_floating_point:
                ema.lerp_(param, 1 - decay)
                param.copy_(ema)


# --------------------------------------------------------------------------- the run


@dataclass
class TrainingData:
    """The training split on the device, as a loader; the validation split on the host."""

    class_names: list[str]
    source: str  # where the dataset was read from, for provenance
    preprocess: Preprocess  # what inference must do to an image; stored in checkpoints
    loader: BatchLoader
    val: Split
    test_images: int  # the test split's size (evaluated after training, not here)


@dataclass
class Run:
    """What the loop reads and changes: built by `setup`, advanced by `train_step`."""

    cfg: Config
    out: Path
    ctx: distributed.Context
    log: Callable[[str], None]
    device: torch.device
    bf16: bool
    data: TrainingData
    model: EmbeddingNet
    criterion: CenterLoss
    optimizer: torch.optim.SGD
    lookahead: Lookahead | None
    total_steps: int
    started: float  # time.perf_counter() when the run (or this resumption) began
    # The model as the step calls it (DDP, torch.compile: see training_forward).
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -1.0  # best validation nearest-center accuracy so far
    bad_loss: torch.Tensor | None = None  # () bool on the device: a loss was not finite
    # (step, time) the time estimate counts from; None once it was logged
    estimate_from: tuple[int, float] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.loader)

    def metrics(self, val: dict[str, float] | None = None) -> dict[str, Any]:
        """The `metrics` entry of a checkpoint, and what `train` returns."""
        return {
            "val": val or (self.history[-1].get("val", {}) if self.history else {}),
            "history": self.history,
            "best_val_nearest_center_accuracy": self.best,
            "train_seconds": time.perf_counter() - self.started,
        }

    def checkpoint(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint dict (see checkpoint.py): everything a resume or export needs,
        with every tensor on the CPU, so a file written on a GPU loads anywhere with
        torch.load(weights_only=True)."""
        return _to_cpu(
            {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "package_version": __version__,
                "config": self.cfg.to_dict(),
                "class_names": list(self.data.class_names),
                "preprocess": self.data.preprocess.to_dict(),
                "embedding_dim": self.cfg.model.embedding_dim,
                "model": self.model.state_dict(),
                "center_loss": self.criterion.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": None if self.lookahead is None else self.lookahead.state,
                "epoch": self.step / self.steps_per_epoch,
                "step": self.step,
                "metrics": metrics,
                "data_source": self.data.source,
            }
        )


def _to_cpu(value: Any) -> Any:
    """The same nested dicts, lists and tuples, with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def setup(
    cfg: Config, out: Path, resume: bool, log: Callable[[str], None], ctx: distributed.Context
) -> Run:
    """Config (a resumed run's own), device, data on the device, model, loss, optimiser and
    lookahead, with a resumed run's state restored into them."""
    started = time.perf_counter()
    cfg, resumed = _config_to_run(cfg, out, resume, log)
    device = resolve_device(cfg.train.device, ctx.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    bf16 = use_bf16(cfg.train.bf16, device)
    data = _load_data(cfg, device, ctx, log)
    model, criterion = _build_model(cfg, data, device)
    optimizer = make_optimizer(model, criterion, cfg)
    total_steps = math.ceil(cfg.train.epochs * len(data.loader))
    every = cfg.train.ema_every
    lookahead = Lookahead(model, total_steps, every) if every else None
    run = Run(
        cfg, out, ctx, log, device, bf16, data, model, criterion, optimizer, lookahead,
        total_steps, started, bad_loss=torch.zeros((), dtype=torch.bool, device=device),
    )  # fmt: skip
    if resumed is not None:
        _restore(run, resumed)
    run.forward = training_forward(model, ctx, cfg.train.compile, device)  # after the restore:
    return run  # DDP broadcasts rank 0's weights when it wraps the model


def _config_to_run(
    cfg: Config, out: Path, resume: bool, log: Callable[[str], None]
) -> tuple[Config, dict[str, Any] | None]:
    """The config and, when resuming, the checkpoint to continue from."""
    if not resume:
        if (out / "last.pt").exists():  # every rank checks, so none waits for a failed one
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return cfg, None
    resumed = load_checkpoint(out / "last.pt")
    if resumed["config"] != cfg.to_dict():
        # The run's own config wins: a resumed run is the same run (threads and
        # precision included, which is why this comes first).
        cfg = Config.from_dict(resumed["config"])
        log(f"resuming with the config stored in {out / 'last.pt'}")
    return cfg, resumed


def _load_data(
    cfg: Config, device: torch.device, ctx: distributed.Context, log: Callable[[str], None]
) -> TrainingData:
    """Decoded once (cached), held on the device as uint8; validation stays on the host."""
    loaded = load_dataset(
        cfg.data.path, cfg.data.image_size, cfg.data.cache_dir, cfg.data.on_bad_image
    )
    if loaded.skipped:
        log(f"skipped {describe_skipped(loaded.skipped)} (data.on_bad_image=fail stops instead)")
    if not len(loaded.test):
        log(f"no test split in {loaded.source} (no test/ folder): no test evaluation")
    dataset = select_classes(loaded, cfg.data.classes)
    if len(dataset.class_names) < 2:
        raise UserError(
            f"{cfg.data.path} has {len(dataset.class_names)} class ({dataset.class_names}); "
            "center loss learns to tell classes apart and needs at least 2"
        )
    train_split, val_split = split_validation(dataset.train, cfg.data.val_size, cfg.data.seed)
    mean, std = channel_stats(train_split.images)
    size = cfg.data.image_size
    preprocess = Preprocess(input_size=(size, size), mean=tuple(mean), std=tuple(std))
    images = torch.from_numpy(np.ascontiguousarray(train_split.images)).to(device)
    labels = torch.from_numpy(train_split.labels).to(device)
    loader = BatchLoader(
        images, labels, cfg.train.batch_size, mean, std, cfg.data.flip, cfg.data.translate,
        cfg.train.seed, ctx.rank, ctx.world_size,
    )  # fmt: skip
    if len(loader) == 0:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {len(labels)} training images"
        )
    return TrainingData(
        dataset.class_names, dataset.source, preprocess, loader, val_split, len(dataset.test)
    )


def _build_model(
    cfg: Config, data: TrainingData, device: torch.device
) -> tuple[EmbeddingNet, CenterLoss]:
    model = EmbeddingNet(cfg.model, len(data.class_names)).to(device)
    images = data.loader.images
    whitening_sample = torch.from_numpy(spread_sample(len(images), 5000)).to(device)
    model.init_whitening(data.loader.normalize(images[whitening_sample]))
    if use_channels_last(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    criterion = CenterLoss(
        len(data.class_names), cfg.model.embedding_dim, cfg.loss.update, cfg.loss.alpha,
        cfg.loss.decay,
    ).to(device)  # fmt: skip
    return model, criterion


def _restore(run: Run, resumed: dict[str, Any]) -> None:
    run.model.load_state_dict(resumed["model"])
    run.criterion.load_state_dict(resumed["center_loss"])
    run.optimizer.load_state_dict(resumed["optimizer"])
    if run.lookahead is not None and resumed.get("ema") is not None:
        run.lookahead.state = {k: v.to(run.device) for k, v in resumed["ema"].items()}
    run.step = resumed["step"]
    run.history = resumed["metrics"].get("history", [])
    run.best = resumed["metrics"].get("best_val_nearest_center_accuracy", -1.0)
    run.log(f"resumed {run.out / 'last.pt'} at step {run.step}/{run.total_steps}")


def training_forward(
    model: EmbeddingNet, ctx: distributed.Context, compile: bool, device: torch.device
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The model as the step calls it: DDP-wrapped under torchrun, and compiled when
    train.compile is on and the device is CUDA.

    CUDA only: on the CPU inductor needs a C++ toolchain at run time (not part of a plain
    install), and on this project's 2-core CPU it compiled the cpu preset's network for
    about a minute to save roughly a tenth of each step (batch 256, bf16; a shared, noisy
    machine): no clear gain for a run of minutes. Validation calls the plain model, as
    eval mode would be a second compilation.
    """
    forward = distributed.wrap(model, ctx)
    if not (compile and device.type == "cuda"):
        return forward
    import torch._inductor.config as inductor_config

    # In bf16, inductor otherwise keeps fused intermediates unrounded, and the backward of
    # the global max pool (torch.amax) compares a rounded activation with an unrounded
    # maximum, matches nothing and divides 0 by 0: NaN from the second step (reproduced
    # on the CPU). Rounding where eager rounds keeps the two in agreement.
    if hasattr(inductor_config, "emulate_precision_casts"):
        inductor_config.emulate_precision_casts = True
    return torch.compile(forward)  # the batch size is fixed (partial batches dropped)


# --------------------------------------------------------------------------- one step


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimiser step on a batch x (b, 3, H, W), y (b,); returns (ce, center, loss),
    still on the device (reading them is a host sync)."""
    cfg, optimizer, criterion = run.cfg, run.optimizer, run.criterion
    factor = lr_factor(run.step, run.total_steps, cfg)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    lam = center_weight_at(run.step, run.steps_per_epoch, cfg)
    b = len(x)
    outliers = int(cfg.loss.outlier_fraction * b) if cfg.loss.outlier_weight > 0 else 0
    if outliers:
        x = torch.cat([x, jigsaw(x[:outliers])])
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        e, logits = run.forward(x)  # (b + outliers, D), (b + outliers, C)
    ce = F.cross_entropy(logits[:b].float(), y, label_smoothing=cfg.loss.label_smoothing)
    center = criterion(e[:b], y)  # updates paper/mean centers after the loss
    loss = ce + lam * center
    if outliers:  # cross-entropy of the outliers to the uniform distribution over classes
        out = logits[b:].float()
        loss = loss + cfg.loss.outlier_weight * (out.logsumexp(1) - out.mean(1)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if criterion.update == "sgd" and criterion.centers.grad is not None and lam > 0:
        criterion.centers.grad.div_(lam)  # the centers' step is not scaled by λ
        criterion.all_reduce_grad()
    optimizer.step()
    run.step += 1
    if run.lookahead is not None and run.step % run.lookahead.every == 0:
        run.lookahead.update(run.model, run.lookahead.decay(run.step))
    return ce, center, loss


def jigsaw(x: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Each image (n, 3, H, W) cut into grid x grid patches and the patches shuffled (one
    permutation per image): an image with the batch's colours and textures but no object,
    a synthetic outlier for loss.outlier_weight. Rows and columns beyond a multiple of grid
    are left as they are."""
    n, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    patches = x[:, :, : ph * grid, : pw * grid].reshape(n, c, grid, ph, grid, pw)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    order = torch.rand(n, grid * grid, device=x.device).argsort(1)
    patches = patches[torch.arange(n, device=x.device)[:, None], order]
    patches = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    out = x.clone()
    out[:, :, : ph * grid, : pw * grid] = patches.reshape(n, c, ph * grid, pw * grid)
    return out


# --------------------------------------------------------------------------- one epoch


@dataclass
class EpochTotals:
    epoch: int  # 0-based
    started: float  # time.perf_counter()
    sums: torch.Tensor  # (3,) on the device: summed ce, summed center loss, step count


def train_epoch(run: Run, stop: _StopFlag) -> EpochTotals:
    """Steps to the end of the current epoch (or of training), from wherever it stands."""
    spe = run.steps_per_epoch
    epoch = run.step // spe
    if epoch >= run.cfg.train.whiten_bias_epochs:
        for g in run.optimizer.param_groups:
            if g["name"] == "whiten_bias":
                g["base_lr"] = 0.0
    run.model.train()
    run.criterion.train()
    totals = EpochTotals(epoch, time.perf_counter(), torch.zeros(3, device=run.device))
    bar = _progress(run, epoch)
    for x, y in run.data.loader.epoch(epoch, start_step=run.step % spe):
        ce, center, loss = train_step(run, x, y)
        one = torch.ones((), device=run.device)
        totals.sums += torch.stack([ce.detach(), center.detach(), one])
        run.bad_loss |= ~torch.isfinite(loss.detach())
        if bar is not None:
            bar.advance(totals.sums)
        _estimate(run)
        if run.device.type == "cpu" or run.step % 50 == 0:  # a host sync: rare on GPU
            _check_finite(run, epoch)
        if run.step >= run.total_steps or run.step % spe == 0:
            break  # an epoch's last step stops after the epoch's validation
        # Processes agree on the step they stop at; on a GPU only every 50 steps,
        # as a collective is a host sync.
        agree = run.ctx.world_size == 1 or run.device.type == "cpu" or run.step % 50 == 0
        if agree and distributed.any_rank(stop.requested, run.device):
            _interrupt(run)
    if bar is not None:
        bar.close()
    _check_finite(run, epoch)
    if run.step >= run.total_steps and run.lookahead is not None:
        run.lookahead.update(run.model, 1.0)  # finish on the averaged weights
    return totals


# --------------------------------------------------------------------------- end of epoch


def end_of_epoch(run: Run, totals: EpochTotals) -> None:
    """Every `eval_every` epochs and after the last: validate, log, checkpoint, best.pt."""
    if not (run.step >= run.total_steps or (totals.epoch + 1) % run.cfg.train.eval_every == 0):
        return
    record = _epoch_record(run, totals)
    if len(run.data.val) and run.ctx.is_main:  # the others would only repeat it
        record["val"], _ = split_metrics(
            run.model, run.criterion.centers, run.data.val, run.data.preprocess, run.device,
            run.bf16,
        )  # fmt: skip
    run.history.append(record)
    if not run.ctx.is_main:
        return
    _log_epoch(record, run.out, run.log)
    warning = not_learning(record["train_ce"], len(run.data.class_names), totals.epoch + 1)
    if warning:
        run.log(warning)
    save_checkpoint(run.out / "last.pt", run.checkpoint(run.metrics(record.get("val"))))
    val_acc = record.get("val", {}).get("nearest_center_accuracy", float(run.step))
    if val_acc >= run.best:
        run.best = val_acc
        atomic_copy(run.out / "last.pt", run.out / "best.pt")


def not_learning(train_ce: float, num_classes: int, epochs_done: int) -> str | None:
    """A warning when, two epochs in, the training cross-entropy is still at or above chance
    (ln C: the loss of uniform guessing), else None. Seen on 2026-12-01: the cpu preset on
    six CIFAR-10 classes, before model.embedding_norm existed, collapsed its features onto
    the centers and ended at 60% accuracy instead of 93% (docs/benchmarks.md, "The default
    model against its predecessors")."""
    chance = math.log(num_classes)
    if epochs_done < 2 or train_ce < chance:
        return None
    return (
        f"warning: after {epochs_done} epochs the training cross-entropy ({train_ce:.3f}) is "
        f"at or above chance (ln {num_classes} = {chance:.3f}): the run is not learning; "
        "lower train.lr or loss.center_weight (or raise loss.center_weight_warmup_epochs); "
        "with model.embedding_norm=none, try rms"
    )


def _epoch_record(run: Run, totals: EpochTotals) -> dict[str, Any]:
    """One line of metrics.jsonl: the epoch's mean losses and speed (validation added later)."""
    spe = run.steps_per_epoch
    n = float(totals.sums[2].clamp_min(1))
    return {
        "epoch": round(run.step / spe, 4),
        "step": run.step,
        "train_ce": float(totals.sums[0]) / n,
        "train_center": float(totals.sums[1]) / n,
        "center_weight": center_weight_at(run.step - 1, spe, run.cfg),
        "images_per_second": float(totals.sums[2])
        * run.cfg.train.batch_size
        / (time.perf_counter() - totals.started),
        "elapsed_seconds": time.perf_counter() - run.started,
    }


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


# --------------------------------------------------------------------------- stopping


class TrainingInterrupted(Interrupted):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume."""


def _interrupt(run: Run) -> NoReturn:
    if run.ctx.is_main:
        save_checkpoint(run.out / "last.pt", run.checkpoint(run.metrics()))
    distributed.barrier(run.ctx)  # nobody exits (and has torchrun stop rank 0) before it saved
    launcher = "center-embed" if run.ctx.world_size == 1 else "torchrun ... -m center_embed.cli"
    raise TrainingInterrupted(
        f"interrupted at step {run.step}/{run.total_steps}; saved {run.out / 'last.pt'}. "
        f"Continue with: {launcher} train --resume {run.out}"
    )


def _check_finite(run: Run, epoch: int) -> None:
    if distributed.any_rank(bool(run.bad_loss), run.device):  # all processes stop together
        raise UserError(
            f"the loss became NaN or infinite by step {run.step} (epoch {epoch + 1}); stopped. "
            f"The last good checkpoint, if any, is {run.out / 'last.pt'}. "
            "Lower train.lr or loss.center_weight."
        )


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


# --------------------------------------------------------------------------- what it does

ESTIMATE_AFTER_STEPS = 20  # steps timed (a tenth of a short run's) before the estimate


def banner(run: Run, preset: str | None = None, default_data: bool = False) -> list[str]:
    """What the run is about to do, before its first step: the data (and, `default_data`,
    that its path is the config's default rather than the user's), the split sizes, the
    schedule, the device, where it writes."""
    cfg, data = run.cfg, run.data
    n_train, n_val = len(data.loader.labels), len(data.val)
    default = default_data and cfg.data.path == DataConfig().path
    steps, spe = run.total_steps, run.steps_per_epoch
    processes = f", {run.ctx.world_size} processes" if run.ctx.world_size > 1 else ""
    lines = [
        f"data      {data.source}"
        + (" (the default data.path, relative to this folder; --data names another)"
           if default else ""),
        f"images    {n_train:,} train, {n_val:,} validation, {data.test_images:,} test; "
        f"{len(data.class_names)} classes",
        f"schedule  {cfg.train.epochs:g} epochs x {spe:,} steps of {cfg.train.batch_size} "
        f"images = {steps:,} steps",
        f"device    {run.device} ({'bf16 autocast' if run.bf16 else 'fp32'}{processes})",
        f"output    {run.out}",
    ]  # fmt: skip
    limit = PRESET_MAX_TRAIN_IMAGES.get(preset or "")
    if limit is not None and n_train > limit:
        lines.append(
            f"note      the {preset} preset is meant for small data (up to {limit:,} training "
            f"images), not {n_train:,}: its tiny network will not learn this set well; "
            "--preset cpu (or gpu) fits a dataset this size"
        )
    return lines


def _estimate(run: Run) -> None:
    """Once, after ESTIMATE_AFTER_STEPS steps: how long the rest of training will take."""
    if run.estimate_from is None:
        return
    first_step, started = run.estimate_from
    done = run.step - first_step
    enough = max(1, min(ESTIMATE_AFTER_STEPS, run.total_steps // 10))
    if done < enough and run.step < run.total_steps:
        return
    seconds = time.perf_counter() - started
    left = (run.total_steps - run.step) * seconds / max(done, 1)
    run.log(
        f"about {format_duration(left)} of training to go ({done / max(seconds, 1e-9):.1f} "
        f"steps/s over {done} steps; each validation adds to it)"
    )
    run.estimate_from = None


def format_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 10 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# --------------------------------------------------------------------------- progress


class _Progress:
    """The epoch's tqdm bar. On a GPU reading the running sums is a host sync, so they are
    read at most once a second; counting steps reads nothing from the device."""

    REFRESH_SECONDS = 1.0

    def __init__(self, run: Run, epoch: int) -> None:
        from tqdm import tqdm  # imported only when a bar is shown

        spe = run.steps_per_epoch
        self.bar = tqdm(
            total=spe, initial=run.step % spe, desc=f"epoch {epoch + 1}", unit="step", leave=False
        )
        self.batch_size = run.cfg.train.batch_size
        self.started = self.shown = time.perf_counter()

    def advance(self, sums: torch.Tensor) -> None:
        """One step done; `sums` (3,) are the epoch's summed ce, center loss and steps."""
        self.bar.update(1)
        now = time.perf_counter()
        if now - self.shown < self.REFRESH_SECONDS:
            return
        self.shown = now
        ce, center, count = sums.tolist()  # the host sync
        count = max(count, 1.0)
        self.bar.set_postfix(
            ce=f"{ce / count:.3f}",
            center=f"{center / count:.3f}",
            img_s=f"{count * self.batch_size / (now - self.started):.0f}",
        )

    def close(self) -> None:
        self.bar.close()


def _progress(run: Run, epoch: int) -> _Progress | None:
    """A bar on rank 0 when train.progress is on; none (and no reads) otherwise."""
    return _Progress(run, epoch) if run.cfg.train.progress and run.ctx.is_main else None


# --------------------------------------------------------------------------- train


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
    preset: str | None = None,
    default_data: bool = False,
) -> dict[str, Any]:
    """Train, writing last.pt, best.pt and metrics.jsonl under out_dir. Returns the
    final validation metrics. Under torchrun every process calls this; rank 0 writes.
    For the banner: `preset`, the preset the config came from; `default_data`, True when
    nobody chose data.path (the CLI had no --data)."""
    ctx = distributed.setup(cfg.train.device)
    try:
        run = setup(cfg, Path(out_dir), resume, log if ctx.is_main else _silent, ctx)
        for line in banner(run, preset, default_data):
            run.log(line)
        run.estimate_from = (run.step, time.perf_counter())
        stop = _StopFlag()
        with stop.installed():
            while run.step < run.total_steps:
                if distributed.any_rank(stop.requested, run.device):  # between epochs
                    _interrupt(run)
                end_of_epoch(run, train_epoch(run, stop))
        final = run.metrics()
        if ctx.is_main:  # last.pt also records the final best, so a finished run says what it did
            save_checkpoint(run.out / "last.pt", run.checkpoint(final))
        # Leave together: tearing gloo down while a peer still uses it can abort the process.
        distributed.barrier(ctx)
        return final
    finally:  # also on an error or an interruption, so the process group never leaks
        distributed.teardown(ctx)


def _silent(message: str) -> None:
    pass
