"""The served model: a `center_embed.runtime.OnnxModel` plus its centers as numpy.

Images go through the runtime chosen (onnxruntime or OpenVINO: the graph computes
embeddings, distances, nearest center and min distance); embedding vectors sent to
/v1/distances go through `distances` here, the contract's same formula in numpy, which
the warm-up checks against the graph's own outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import nearest_centers, read_centers, squared_distances
from center_embed.errors import UserError
from center_embed.fileio import sha256_file
from center_embed.runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, OnnxModel, describe

WARMUP_SEED = 0


class ServedModel:
    """What the app needs of a model; tests may wrap `run` (e.g. to hold a batch back)."""

    def __init__(self, model: OnnxModel, centers: np.ndarray, sha256: str) -> None:
        self.model = model
        self.info = model.info
        self.centers = centers  # (C, D) float32
        self.center_norms = (centers.astype(np.float64) ** 2).sum(1).astype(np.float32)  # (C,)
        # ‖e‖² − 2·e·c + ‖c‖² stays below float32's max/4 when ‖e‖ + ‖c‖ is below half its
        # square root: the embedding norm /v1/distances accepts.
        largest_center = float(np.sqrt(self.center_norms.max(initial=0.0)))
        self.max_embedding_norm = 0.5 * float(np.sqrt(np.finfo(np.float32).max)) - largest_center
        self.sha256 = sha256
        h, w = self.info.input_size
        if h != w:
            raise UserError(f"{model.path}: only square inputs are served, not {h}x{w}")
        if centers.shape != (self.info.num_classes, self.info.embedding_dim):
            raise ValueError(
                f"centers have shape {centers.shape}; metadata says "
                f"({self.info.num_classes}, {self.info.embedding_dim})"
            )

    @classmethod
    def open(
        cls,
        path: str | Path,
        device: str = "auto",
        threads: int = 0,
        *,
        runtime: str = DEFAULT_RUNTIME,
        precision: str = DEFAULT_PRECISION,
    ) -> ServedModel:
        path = Path(path)
        # No spinning: the server's own threads (decoding, HTTP) need the cores between runs.
        model = OnnxModel(
            path, device, threads, spinning=False, runtime=runtime, precision=precision
        )
        return cls(model, read_centers(path), sha256_file(path))

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def runtime(self) -> dict[str, Any]:
        """Runtime, precision, device, threads, and why they were chosen (/v1/model)."""
        return self.model.runtime

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) -> embeddings, distances, labels, min_distances."""
        return self.model.run(images)

    def unknown(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """True where an image's min distance exceeds its nearest class's threshold."""
        return self.info.unknown(outputs["min_distances"], outputs["labels"])

    def distances(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N, D) -> distances (N, C), labels (N,), min_distances (N,), as the graph."""
        d = squared_distances(embeddings, self.centers, self.center_norms)
        return {"distances": d, **nearest_centers(d)}

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run the graph once per batch size, and check that the centers read from the file
        give the graph's own distances (so /v1/distances agrees with /v1/classify)."""
        h, w = self.info.input_size
        rng = np.random.default_rng(WARMUP_SEED)
        for n in batch_sizes:
            images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
            out = self.run(images)
            if not all(np.isfinite(v).all() for v in out.values()):
                raise RuntimeError("the model gave non-finite outputs at warm-up")
        ours = self.distances(out["embeddings"])["distances"]
        scale = max(1.0, float(np.abs(out["distances"]).max()))
        error = float(np.abs(ours - out["distances"]).max()) / scale
        if error > 1e-3:
            raise RuntimeError(
                f"distances from the file's centers differ from the graph's by {error:.2e} "
                "(relative): the centers initializer is not what the graph uses"
            )

    def summary(self) -> dict[str, Any]:
        """The short description every classify / distances answer carries."""
        return {
            "sha256": self.sha256,
            "precision": self.info.precision,
            "embedding_dim": self.info.embedding_dim,
            "num_classes": self.info.num_classes,
            "unknown_threshold": self.info.unknown_threshold,
            "provider": self.provider,
        }

    def metadata(self) -> dict[str, Any]:
        return describe(self.info)
