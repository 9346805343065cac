"""A fast CIFAR CNN of the airbench94 family, split into `embed` and `head`.

    images (B, 3, H, W), normalised
      -> whitening conv 2x2 (frozen weights from the patch covariance) -> GELU
      -> 3 x ConvGroup(conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU)
      -> global max pool -> linear -> batch norm or RMS (optional) = embed(x)  (B, D)
         (feature_maps(x): the whitened input and each group's output, for export)
      -> linear, scaled by logit_scale                              = head(e)   (B, C)

The center loss acts on `embed(x)`; export wraps `embed` and the centers. The only
constructor argument is a typed `ModelConfig` (plus the class count), which the
checkpoint stores, so any tool rebuilds the network from the file alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from center_embed.training.config import ModelConfig


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale (only the bias learns), as airbench does."""

    def __init__(self, num_features: int, momentum: float, eps: float = 1e-12) -> None:
        # airbench states momentum as the weight of the old statistic; torch the new one.
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class BatchRMSNorm(nn.Module):
    """Each dimension divided by its root mean square over the batch, x / sqrt(E[x²] + eps),
    with a running E[x²] for inference (a fixed per-dimension scale, like BatchNorm's).

    BatchNorm without the mean: the embedding's scale is fixed, so center loss cannot shrink
    it, but the origin stays where it was, so a short embedding (an image that excites no
    feature) stays short and `‖e‖` keeps meaning how familiar an image looks.
    """

    running_square: torch.Tensor

    def __init__(self, dim: int, momentum: float, eps: float = 1e-12) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps  # momentum: weight of the new statistic
        self.register_buffer("running_square", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # (B, D); the statistic in fp32 whatever autocast did
        if self.training:
            square = x.pow(2).mean(0)  # (D,)
            with torch.no_grad():
                self.running_square.lerp_(square.detach(), self.momentum)
        else:
            square = self.running_square
        return x * torch.rsqrt(square + self.eps)


class Conv(nn.Conv2d):
    """3x3 'same' conv, dirac-initialised so each layer starts close to the identity."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, batchnorm_momentum: float) -> None:
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.norm1 = BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out, batchnorm_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class EmbeddingNet(nn.Module):
    WHITEN_KERNEL = 2

    def __init__(self, config: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.config, self.num_classes = config, num_classes
        w1, w2, w3 = config.widths
        whiten_width = 2 * 3 * self.WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(3, whiten_width, self.WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from data by init_whitening()
        nn.init.zeros_(self.whiten.bias)
        m = config.batchnorm_momentum
        self.groups = nn.Sequential(
            ConvGroup(whiten_width, w1, m), ConvGroup(w1, w2, m), ConvGroup(w2, w3, m)
        )
        self.embedding = nn.Linear(w3, config.embedding_dim, bias=False)
        # The embedding's scale fixed per dimension over the batch (running statistics at
        # inference), so center loss cannot shrink it (see ModelConfig.embedding_norm). A tiny
        # eps, as in BatchNorm above: with 1e-5 a shrunken layer would shrink it after all.
        d = config.embedding_dim
        self.embedding_norm = {
            "batchnorm": lambda: nn.BatchNorm1d(d, eps=1e-12, momentum=1 - m, affine=False),
            "rms": lambda: BatchRMSNorm(d, momentum=1 - m),
            "none": nn.Identity,
        }[config.embedding_norm]()
        self.classifier = nn.Linear(config.embedding_dim, num_classes, bias=False)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after the whitening and after each conv group: (B, 24, H-1, W-1),
        (B, w1, H/2, W/2), (B, w2, H/4, W/4), (B, w3, H/8, W/8). The exported graph reads
        the first three for the atypicality of an image (export/atypicality.py)."""
        maps = [F.gelu(self.whiten(x))]
        for group in self.groups:
            maps.append(group(maps[-1]))
        return maps

    def embed_maps(self, last: torch.Tensor) -> torch.Tensor:
        """The embedding (B, D) from the last feature map (B, w3, H/8, W/8)."""
        x = torch.amax(last, dim=(2, 3))  # (B, w3): global max pool
        return self.embedding_norm(self.embedding(x))  # (B, D)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_maps(self.feature_maps(x)[-1])  # (B, D)

    def head(self, e: torch.Tensor) -> torch.Tensor:
        return self.classifier(e) * self.config.logit_scale  # (B, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return e, self.head(e)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten 2x2 patches of `images` (N, 3, H, W), normalised.

        The filters are the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue),
        and their negatives (so the GELU after it keeps both signs).
        """
        k = self.WHITEN_KERNEL
        c = images.shape[1]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, c, H', W', k, k)
        patches = patches.transpose(1, 3).reshape(-1, c * k * k)  # (P, c*k*k), conv layout
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
        filters = eigenvectors.T.reshape(c * k * k, c, k, k).flip(0)
        filters = filters / torch.sqrt(eigenvalues + eps)
        self.whiten.weight.copy_(torch.cat((filters, -filters)).to(self.whiten.weight))
