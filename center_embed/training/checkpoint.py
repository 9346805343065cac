"""Checkpoints: self-describing, atomic, and loadable with `weights_only=True`.

A checkpoint is a dict of plain Python types and tensors:

    format_version  int, CHECKPOINT_FORMAT_VERSION
    config          Config.to_dict(): every option of the run
    class_names     list[str], index = label
    preprocess      {"input_size": [H, W], "mean": [3], "std": [3], "layout": ..., "resize": ...}
    embedding_dim   int
    model           state_dict of EmbeddingNet
    center_loss     state_dict of CenterLoss (centers, counts, sums)
    optimizer       optimizer state_dict (for resuming)
    ema             lookahead EMA state (for resuming), or None
    epoch, step     progress: completed epochs (float while mid-epoch), optimizer steps
    metrics         {"val": {...}, "history": [...], ...}
    package_version str

The exporter reads this file and nothing else, once, into a `Checkpoint`: the same
fields, typed, with the config rebuilt as a Config; `Checkpoint.to_dict()` gives back the
dict above. The training loop writes and resumes from the plain dict.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from center_embed.errors import UserError
from center_embed.fileio import atomic_write
from center_embed.training.config import Config

CHECKPOINT_FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version", "config", "class_names", "preprocess", "embedding_dim", "model",
    "center_loss", "epoch", "step", "metrics",
)  # fmt: skip


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename over it."""
    import torch

    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint, raising UserError for anything a user can fix."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"{path} is not a center-embed checkpoint")
    if ckpt["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format version {ckpt['format_version']}; "
            f"this center-embed reads version {CHECKPOINT_FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks checkpoint fields: {', '.join(missing)}")
    return ckpt


@dataclass(frozen=True)
class Preprocess:
    """What inference does to an image before the network, fixed by the training data:
    stored in every checkpoint (as `to_dict()`) and written into the ONNX graph and its
    metadata, so training and serving can never disagree."""

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]  # per RGB channel, of pixels scaled to [0, 1]
    std: tuple[float, float, float]
    layout: str = "NHWC uint8 RGB"
    resize: str = "shorter side to input size (bilinear), centre crop"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(int(v) for v in values["input_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            layout=values.get("layout", cls.layout),
            resize=values.get("resize", cls.resize),
        )

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's plain form (lists, so `weights_only` loading reads it)."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "resize": self.resize,
        }


@dataclass
class Checkpoint:
    """A checkpoint loaded and checked once; what export and its checks read from it."""

    config: Config
    class_names: list[str]  # index = label
    preprocess: Preprocess
    embedding_dim: int
    model_state: dict[str, Any]  # EmbeddingNet state_dict
    center_loss_state: dict[str, Any]  # CenterLoss state_dict (centers, counts, sums)
    epoch: float
    step: int
    metrics: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    ema_state: dict[str, Any] | None = None
    package_version: str | None = None
    data_source: str | None = None  # where the run read its dataset

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read and check `path` (UserError for anything a user can fix)."""
        return cls.from_dict(load_checkpoint(path))

    @classmethod
    def from_dict(cls, ckpt: dict[str, Any]) -> Checkpoint:
        """From a dict `load_checkpoint` returned (already checked)."""
        return cls(
            config=Config.from_dict(ckpt["config"]),
            class_names=list(ckpt["class_names"]),
            preprocess=Preprocess.from_dict(ckpt["preprocess"]),
            embedding_dim=int(ckpt["embedding_dim"]),
            model_state=ckpt["model"],
            center_loss_state=ckpt["center_loss"],
            epoch=ckpt["epoch"],
            step=ckpt["step"],
            metrics=ckpt["metrics"],
            optimizer_state=ckpt.get("optimizer"),
            ema_state=ckpt.get("ema"),
            package_version=ckpt.get("package_version"),
            data_source=ckpt.get("data_source"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (the module docstring), keys in the order training writes them."""
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "package_version": self.package_version,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "preprocess": self.preprocess.to_dict(),
            "embedding_dim": self.embedding_dim,
            "model": self.model_state,
            "center_loss": self.center_loss_state,
            "optimizer": self.optimizer_state,
            "ema": self.ema_state,
            "epoch": self.epoch,
            "step": self.step,
            "metrics": self.metrics,
            "data_source": self.data_source,
        }

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build_model(self):
        """(EmbeddingNet, CenterLoss) with the stored weights, in eval mode."""
        from center_embed.training.center_loss import CenterLoss
        from center_embed.training.model import EmbeddingNet

        cfg = self.config
        model = EmbeddingNet(cfg.model, self.num_classes)
        model.load_state_dict(self.model_state)
        criterion = CenterLoss(
            self.num_classes, cfg.model.embedding_dim, cfg.loss.update, cfg.loss.alpha,
            cfg.loss.decay,
        )  # fmt: skip
        criterion.load_state_dict(self.center_loss_state)
        return model.eval(), criterion.eval()


def build_model(ckpt: dict[str, Any]):
    """(EmbeddingNet, CenterLoss, Config) of a checkpoint dict, the networks in eval mode."""
    checkpoint = Checkpoint.from_dict(ckpt)
    model, criterion = checkpoint.build_model()
    return model, criterion, checkpoint.config
