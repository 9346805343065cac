"""Opening an exported model: the onnxruntime session over the file contract.

This is the one place that creates onnxruntime sessions; the HTTP service, the batch
scorer, the report and `export verify` all go through it. What the file holds (names,
metadata, the distance formula) is center_embed.contract's. It imports numpy, Pillow and
onnxruntime only (never torch), so a serving install stays small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import (
    INPUT_NAME,
    OUTPUT_NAMES,
    ModelInfo,
    our_metadata,
    parse_metadata,
    run_batched,
)
from center_embed.errors import UserError
from center_embed.imageio import decode_image


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str = "auto") -> list[str]:
    """CUDA when the GPU build of onnxruntime and a GPU are present (or asked for), else CPU."""
    available = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "gpu"):
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                "CUDA was asked for but this onnxruntime has no CUDA provider; "
                "pip install '.[gpu]' (onnxruntime-gpu) instead of onnxruntime"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise UserError(f"device must be auto, cpu or cuda, not {device!r}")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(path: str | Path, device: str = "auto", threads: int = 0, spinning: bool = True):
    """An onnxruntime InferenceSession with every graph optimisation on.

    threads: intra-op threads (0: onnxruntime's default, one per core).
    spinning: let idle intra-op threads busy-wait for work. Good for back-to-back runs in one
    process; a server sharing its cores with request handling is faster without it
    (measured here: 2.5 instead of 3.3 ms of CPU per image).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=choose_providers(device))
    except Exception as e:  # onnxruntime raises its own untyped errors for bad files
        if "InvalidProtobuf" in type(e).__name__ or "Load model" in str(e) or "protobuf" in str(e):
            raise UserError(f"{path} is not a readable ONNX model") from None
        raise


class OnnxModel:
    """An exported center-embed model, ready to run on uint8 image batches."""

    def __init__(
        self, path: str | Path, device: str = "auto", threads: int = 0, spinning: bool = True
    ) -> None:
        self.path = Path(path)
        self.session = create_session(self.path, device, threads, spinning)
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = parse_metadata(props, str(self.path))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or list(outputs) != list(OUTPUT_NAMES):
            raise UserError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; expected "
                f"[{INPUT_NAME!r}] and {list(OUTPUT_NAMES)}"
            )

    @property
    def provider(self) -> str:
        """The execution provider actually in use (the first one the session kept)."""
        return self.session.get_providers()[0]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images uint8 (N, H, W, 3) RGB -> embeddings (N, D), distances (N, C),
        labels (N,) int64, min_distances (N,)."""
        h, w = self.info.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(f"images must be uint8 (N, {h}, {w}, 3), got {images.dtype} "
                             f"{images.shape}")  # fmt: skip
        values = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images)})
        return dict(zip(OUTPUT_NAMES, values, strict=True))

    def run_batched(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """`run` over any number of images (a memory-mapped split too), in batches."""
        return run_batched(self.run, images, batch_size)

    def decode(self, data: bytes | str | Path, max_pixels: int | None = None) -> np.ndarray:
        """One image (bytes or a path) as uint8 (H, W, 3), by the model's resize policy."""
        h, w = self.info.input_size
        if h != w:
            raise UserError(f"{self.path}: only square inputs are supported, got {h}x{w}")
        return decode_image(data, h, max_pixels)

    def unknown(self, min_distances: np.ndarray) -> np.ndarray:
        """True where the min distance exceeds the model's global unknown threshold."""
        if self.info.unknown_threshold is None:
            return np.zeros(len(min_distances), dtype=bool)
        return min_distances > self.info.unknown_threshold


def describe(info: ModelInfo) -> dict[str, Any]:
    """Metadata as plain JSON-able values (JSON strings decoded), for `inspect` and /v1/model."""
    out: dict[str, Any] = {}
    for name, value in sorted(our_metadata(info.metadata).items()):
        try:
            out[name] = json.loads(value)
        except (ValueError, TypeError):
            out[name] = value
    return out
