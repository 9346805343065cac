"""The atypicality of an image: how far its low-level feature statistics lie beyond those of
the training images, in the units of the unknown score. Export adds it to the image's
unknown score (never to a distance: labels and the ranking of centers do not change) and
returns it as the output `atypicality`.

    m_l = EmbeddingNet.feature_maps(x)[l], l in LAYERS    the whitened input, groups 1 and 2
    f_l = [mean, std, mean absolute deviation] over space of each channel of m_l  (B, 3·C_l)
    s_l = log ‖W_l·(f_l − μ_l)‖²        log Mahalanobis distance to the training images' f_l:
                                         μ_l, Σ_l fitted on training images, W_lᵀW_l = Σ_l⁻¹
                                         (Σ_l shrunk by SHRINKAGE·tr(Σ_l)/dim toward a sphere)
    z_l = (s_l − mean_l) / std_l         standardised on other training images
    a   = Σ_l z_l / √L                   one standard score for the three layers
    atypicality = weight · scale · max(0, a − a₀)
                                         a₀: the `quantile` of a over those images; scale: the
                                         std of their unknown score without it (score units)

Why: the embedding is shaped by the classes alone, so an image unlike every training image
(a flat colour, noise, rendered text, flat shapes) can still land near a center and be
served as a known class. The early layers respond to colour, edges and texture; their
pooled statistics put such images far outside the training images' cloud (the mean absolute
deviation beside the std says how sparse a channel's response is: a few sharp edges on flat
ground, as in rendered text or block-blurred images, against texture everywhere). A Gaussian
over pooled activations follows Lee et al. (2018; here one per layer, without classes);
counting only what lies beyond the training images' own range follows Sastry & Oore (2020):
natural images get 0, so the center score alone ranks them, and open-set recognition
(new classes of natural images, which these statistics cannot tell apart) is left as it was
(docs/benchmarks.md for the measurements and the choice of layers, quantile and weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from center_embed.contract import DEFAULT_ATYPICALITY_QUANTILE
from center_embed.errors import UserError
from center_embed.training.checkpoint import Preprocess

LAYERS = (0, 1, 2)  # indices into EmbeddingNet.feature_maps: whitened input, groups 1 and 2
LAYER_NAMES = ("whitened input", "conv group 1", "conv group 2")  # of LAYERS, for metadata
FIT_IMAGES = 10_000  # training images the Gaussians are fitted on
NORM_IMAGES = 2_000  # other training images that standardise the scores and set the gate
MIN_IMAGES = 50  # fewer training images than this: no atypicality (export says so)
SHRINKAGE = 1e-3
# The share of training images whose atypicality is 0. Chosen on validation images
# (docs/benchmarks.md): 0.98 against 0.99 caught more of the far-OOD sets (glyphs
# AUROC 0.981 -> 0.990, blurred 0.949 -> 0.965, ten classes, 3 seeds) at no open-set cost
# (0.7428 -> 0.7423 over 3 splits); the unknown threshold is calibrated after it either way.
DEFAULT_QUANTILE = DEFAULT_ATYPICALITY_QUANTILE
DEFAULT_WEIGHT = 1.0


@dataclass(frozen=True)
class AtypicalityOptions:
    """How export fits the `atypicality` output: one typed value from the CLI to the graph.

    enabled: False exports no such output. quantile: the share of training images whose
    atypicality is 0 (the gate). weight: its scale, in units of the std of the training
    images' min score. seed: the permutation that splits the fitting images."""

    enabled: bool = True
    quantile: float = DEFAULT_QUANTILE
    weight: float = DEFAULT_WEIGHT
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise UserError(f"the atypicality quantile must lie in (0, 1), not {self.quantile}")
        if self.weight <= 0:
            raise UserError(f"the atypicality weight must be positive, not {self.weight}")


def pooled_statistics(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 3C): each channel's mean, standard deviation and mean absolute
    deviation over space, in fp32. Deviations from the mean in two passes: E[x²] − E[x]²
    would cancel where a runtime computes in bf16 (OpenVINO's bf16 keeps 8 bits of
    mantissa)."""
    x = feature_map.float()
    mean = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    deviation = x - mean  # (B, C, H, W)
    std = ((deviation * deviation).mean((2, 3)) + 1e-12).sqrt()  # (B, C)
    return torch.cat([mean.flatten(1), std, deviation.abs().mean((2, 3))], 1)


class Atypicality(nn.Module):
    """feature maps -> atypicality (B,) >= 0 (the module docstring's formula); every
    constant a buffer, so the exported graph carries them."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = len(dims)
        for i, d in enumerate(dims):
            self.register_buffer(f"mean{i}", torch.zeros(d))
            self.register_buffer(f"whitening{i}", torch.eye(d))  # Wᵀ: (f − μ) @ Wᵀ
        self.register_buffer("log_mean", torch.zeros(len(dims)))
        self.register_buffer("log_std", torch.ones(len(dims)))
        self.register_buffer("gate", torch.zeros(()))  # a₀
        self.register_buffer("scale", torch.ones(()))  # weight · scale

    def log_distances(self, stats: list[torch.Tensor]) -> torch.Tensor:
        """Pooled statistics [(B, 3C_l)] -> (B, L): s_l, each layer's log Mahalanobis
        distance."""
        scores = []
        for i, f in enumerate(stats):
            w = (f - getattr(self, f"mean{i}")) @ getattr(self, f"whitening{i}")  # (B, 3C)
            scores.append(torch.log((w * w).sum(1) + 1e-12))  # (B,)
        return torch.stack(scores, 1)

    def standard_score(self, stats: list[torch.Tensor]) -> torch.Tensor:
        """(B,): a = Σ_l z_l / √L."""
        z = (self.log_distances(stats) - self.log_mean) / self.log_std  # (B, L)
        return z.sum(1) / math.sqrt(self.layers)

    def forward_statistics(self, stats: list[torch.Tensor]) -> torch.Tensor:
        """Pooled statistics [(B, 3C_l)] -> atypicality (B,)."""
        return (self.standard_score(stats) - self.gate).clamp_min(0) * self.scale

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """feature_maps(x) (all of them) -> atypicality (B,)."""
        return self.forward_statistics([pooled_statistics(maps[layer]) for layer in LAYERS])


@dataclass
class Fitted:
    module: Atypicality
    options: AtypicalityOptions  # what it was fitted with (a refit uses the same)
    facts: dict[str, Any]  # what the model's `atypicality` metadata says


# A source of pooled statistics: uint8 images (n, H, W, 3) -> ([(n, 3C_l) per layer of
# LAYERS], embeddings (n, D)), float32 tensors.
Statistics = Callable[[np.ndarray], tuple[list[torch.Tensor], torch.Tensor]]


def fit_atypicality(
    model,
    images: np.ndarray,
    preprocess: Preprocess,
    min_scores: Callable[[np.ndarray], np.ndarray],
    options: AtypicalityOptions = AtypicalityOptions(),  # noqa: B008 (frozen)
) -> Fitted | None:
    """Fit the atypicality of `model` (an EmbeddingNet in eval mode, in torch fp32) on
    training `images` uint8 (N, H, W, 3); None when there are fewer than MIN_IMAGES.
    `min_scores`: embeddings (n, D) numpy -> the unknown score without the atypicality
    (n,), whose spread sets the scale."""
    return fit_on(torch_statistics(model, preprocess), images, min_scores, options)


@torch.no_grad()
def fit_on(
    statistics: Statistics,
    images: np.ndarray,
    min_scores: Callable[[np.ndarray], np.ndarray],
    options: AtypicalityOptions = AtypicalityOptions(),  # noqa: B008 (frozen)
) -> Fitted | None:
    """The atypicality fitted on what `statistics` gives for training `images` (the torch
    model's, or an exported graph's own: `graph_statistics`). Of a seeded permutation of
    the images, NORM_IMAGES (at most a fifth) standardise and gate, and up to FIT_IMAGES
    of the rest fit the Gaussians."""
    n = len(images)
    if n < MIN_IMAGES:
        return None
    quantile, weight = options.quantile, options.weight
    order = np.random.default_rng(options.seed).permutation(n)
    n_norm = min(NORM_IMAGES, n // 5)
    norm_index, fit_index = np.sort(order[:n_norm]), np.sort(order[n_norm:][:FIT_IMAGES])
    fit_stats, _ = statistics(images[fit_index])
    module = Atypicality([s.shape[1] for s in fit_stats])
    for i, x in enumerate(fit_stats):
        mean, whitening = _gaussian(x.double())
        getattr(module, f"mean{i}").copy_(mean)
        getattr(module, f"whitening{i}").copy_(whitening)
    norm_stats, embeddings = statistics(images[norm_index])
    s = module.log_distances(norm_stats)  # (n_norm, L)
    module.log_mean.copy_(s.mean(0))
    module.log_std.copy_(s.std(0).clamp_min(1e-6))
    gate = float(np.quantile(module.standard_score(norm_stats).double().numpy(), quantile))
    spread = float(np.std(min_scores(embeddings.numpy())))
    module.gate.fill_(gate)
    module.scale.fill_(weight * max(spread, 1e-6))
    facts = {
        "layers": list(LAYER_NAMES),
        "statistics": "each channel's mean, std and mean absolute deviation over space; "
        "one Gaussian per layer",
        "fit_images": int(len(fit_index)),
        "norm_images": int(n_norm),
        "quantile": quantile,
        "weight": weight,
        "gate": gate,
        "scale": float(module.scale),
        "rule": "weight · std(min score) · max(0, Σ_l z_l / √L − gate), z_l the log "
        "Mahalanobis distance of layer l standardised on training images, gate its quantile",
    }
    return Fitted(module.eval(), options, facts)


def _gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) float64 -> the mean (d,) and Wᵀ (d, d) with ‖(f − μ) @ Wᵀ‖² the Mahalanobis
    distance under the shrunk covariance, both float32."""
    mean = x.mean(0)
    d = len(mean)
    cov = torch.cov(x.T).reshape(d, d)
    cov += SHRINKAGE * cov.trace().clamp_min(1e-12) / d * torch.eye(d, dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)  # cov = V Λ Vᵀ, so Σ⁻¹ = (V Λ^-½)(V Λ^-½)ᵀ
    return mean.float(), (vectors / values.clamp_min(1e-30).sqrt()).float()


def torch_statistics(model, preprocess: Preprocess, batch: int = 500) -> Statistics:
    """The pooled statistics and embeddings of an EmbeddingNet in torch fp32."""
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255

    @torch.no_grad()
    def run(images: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        stats: list[list[torch.Tensor]] = [[] for _ in LAYERS]
        embeddings = []
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.array(images[start : start + batch]))
            maps = model.feature_maps((chunk.permute(0, 3, 1, 2).float() - mean) / std)
            for i, layer in enumerate(LAYERS):
                stats[i].append(pooled_statistics(maps[layer]))
            embeddings.append(model.embed_maps(maps[-1]).float())
        return [torch.cat(s) for s in stats], torch.cat(embeddings)

    return run


# --------------------------------------------------------------------------- in a graph
#
# A reduced-precision graph (int8) computes its feature maps, and so their statistics,
# differently from torch fp32: on CIFAR-10 the fp32 fit gave 1.5% of held-out images an
# atypicality above 0 under int8 instead of 1.2%, and on a narrow network 17% instead of 1%
# (the gate at 0.99).
# So such a graph is refitted on its own statistics: its buffers are initializers named
# `atypicality.<buffer>` (the exporter keeps the module's state_dict names), and each
# layer's pooled statistics are the first input of the Sub that reads `atypicality.mean<i>`.

PREFIX = "atypicality."


def graph_statistics(proto, embeddings_name: str, batch: int = 256) -> Statistics:
    """The pooled statistics and embeddings as an exported graph (onnx ModelProto with an
    atypicality) computes them, run by onnxruntime on the CPU."""
    import onnx
    import onnxruntime as ort

    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    readers = {x: node for node in graph.graph.node for x in node.input}
    names = [readers[f"{PREFIX}mean{i}"].input[0] for i in range(len(LAYERS))]
    existing = {o.name for o in graph.graph.output}
    for name in names:
        if name not in existing:
            graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        parts: list[list[np.ndarray]] = [[] for _ in range(len(names) + 1)]
        for start in range(0, len(images), batch):
            chunk = np.ascontiguousarray(images[start : start + batch])
            values = session.run([*names, embeddings_name], {input_name: chunk})
            for part, value in zip(parts, values, strict=True):
                part.append(value)
        values = [torch.from_numpy(np.concatenate(p)).float() for p in parts]
        return values[:-1], values[-1]

    return run


def write_into(proto, module: Atypicality) -> None:
    """Replace the graph's `atypicality.*` initializers with `module`'s buffers."""
    from onnx import numpy_helper

    buffers = {PREFIX + k: v for k, v in module.state_dict().items()}
    found = set()
    for init in proto.graph.initializer:
        if init.name in buffers:
            value = buffers[init.name].detach().cpu().numpy()
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
            found.add(init.name)
    if found != set(buffers):
        raise RuntimeError(f"the graph lacks the initializers {sorted(set(buffers) - found)}")
