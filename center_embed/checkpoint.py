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

The exporter reads this file and nothing else.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from center_embed.errors import UserError
from center_embed.fileio import atomic_write

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


def build_model(ckpt: dict[str, Any]):
    """Rebuild the EmbeddingNet and CenterLoss stored in a checkpoint, in eval mode."""
    from center_embed.center_loss import CenterLoss
    from center_embed.config import Config
    from center_embed.model import EmbeddingNet

    cfg = Config.from_dict(ckpt["config"])
    num_classes = len(ckpt["class_names"])
    model = EmbeddingNet(cfg.model, num_classes)
    model.load_state_dict(ckpt["model"])
    criterion = CenterLoss(
        num_classes, cfg.model.embedding_dim, cfg.loss.update, cfg.loss.alpha, cfg.loss.decay
    )
    criterion.load_state_dict(ckpt["center_loss"])
    return model.eval(), criterion.eval(), cfg
