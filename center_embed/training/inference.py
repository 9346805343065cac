"""Running a trained network: the device and precision choices, and batched embedding.

Training (for validation), `center-embed eval` and the export checks all embed images
through here, so a figure measured during training is the figure eval reports.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from center_embed.data import Split
from center_embed.errors import UserError
from center_embed.metrics import accuracy, intra_inter_ratio, nearest_center
from center_embed.training.checkpoint import Preprocess
from center_embed.training.model import EmbeddingNet

# --------------------------------------------------------------------------- device


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device={name!r} is not a device name") from None


def use_bf16(setting: str, device: torch.device) -> bool:
    """bf16 autocast pays on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_channels_last(setting: str, device: torch.device) -> bool:
    # Measured on this project's 2-core Xeon: 1.3-1.7x faster per step in channels_last.
    return setting != "off"


# --------------------------------------------------------------------------- embedding


@torch.no_grad()
def embed_images(
    model: EmbeddingNet,
    images: np.ndarray | torch.Tensor,
    mean: list[float],
    std: list[float],
    device: torch.device,
    bf16: bool = False,
    tta: int = 0,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Embeddings (N, D) float32 on the CPU for uint8 images (N, H, W, 3).

    tta=1 averages the embedding of each image and its mirror; tta=2 also averages the
    views shifted one pixel up-left and down-right (reflect padded), weighting the
    untranslated pair by one half, as airbench does. The head is linear, so logits of the
    averaged embedding equal the averaged logits.
    """
    model.eval()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    out = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
        x = (chunk.permute(0, 3, 1, 2).float() - m) / s  # (b, 3, H, W), channels_last
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(_embed_tta(model, x, tta).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.embedding_dim)


def _embed_tta(model: EmbeddingNet, x: torch.Tensor, tta: int) -> torch.Tensor:
    def mirror(v: torch.Tensor) -> torch.Tensor:
        if tta == 0:
            return model.embed(v).float()
        return 0.5 * (model.embed(v).float() + model.embed(v.flip(-1)).float())

    e = mirror(x)
    if tta < 2:
        return e
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirror(padded[..., :h, :w]) + mirror(padded[..., 2 : h + 2, 2 : w + 2]))
    return 0.5 * e + 0.5 * shifted


def split_metrics(
    model: EmbeddingNet,
    centers: torch.Tensor,
    split: Split,
    preprocess: Preprocess,
    device: torch.device,
    bf16: bool,
    tta: int = 0,
) -> tuple[dict[str, float], torch.Tensor]:
    """Softmax and nearest-center accuracy and the intra/inter ratio on one split."""
    e = embed_images(model, split.images, preprocess.mean, preprocess.std, device, bf16, tta)
    with torch.no_grad():
        predicted = model.head(e.to(device)).argmax(1).cpu().numpy()
    e_np, c_np = e.numpy(), centers.detach().float().cpu().numpy()
    metrics = {
        "softmax_accuracy": accuracy(predicted, split.labels),
        "nearest_center_accuracy": accuracy(nearest_center(e_np, c_np), split.labels),
        "intra_inter_ratio": intra_inter_ratio(e_np, split.labels, c_np),
    }
    return metrics, e
