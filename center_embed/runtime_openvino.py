"""The OpenVINO backend of center_embed.runtime: the same .onnx file, on the CPU.

OpenVINO reads the ONNX file as it is (no conversion step, no second artifact) and compiles
it for the CPU at a given inference precision: f32, or bf16 on CPUs with AVX512-BF16 or
AMX, where its convolutions and matrix products run on the bf16 units (docs/runtimes.md,
for speed and parity). The precision is always set explicitly: OpenVINO's own default on a
bf16 CPU is bf16, which must never happen to a user who asked for fp32.

Thread safety: a compiled model runs one inference request at a time per request object,
so each calling thread gets its own request (the scorer runs batches from several threads).
Imports openvino only when a backend is built; never torch.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from center_embed.contract import (
    ALL_OUTPUT_NAMES,
    ATYPICALITY,
    INPUT_NAME,
    center_scores,
    parse_metadata,
    read_centers,
    read_metadata_props,
)
from center_embed.errors import UserError

INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "fp16": "f32"}


class OpenVinoBackend:
    """OpenVINO on the CPU: one compiled model, one inference request per calling thread."""

    name = "openvino"
    provider = "CPU"

    def __init__(self, path: Path, precision: str, threads: int = 0, streams: int = 1) -> None:
        import openvino as ov

        self.path = path
        self.threads = threads
        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
            "NUM_STREAMS": str(max(1, streams)),
        }
        if threads:  # OpenVINO counts the threads of all streams together
            config["INFERENCE_NUM_THREADS"] = str(threads * max(1, streams))
        try:
            model = core.read_model(str(path))
        except RuntimeError:
            raise UserError(f"{path} is not a readable ONNX model") from None
        self.compiled = core.compile_model(model, "CPU", config)
        self._local = threading.local()
        # In bf16 the graph's distance tail (e.g. ‖e‖² − 2·e·Cᵀ + ‖c‖²) would cancel in bf16 too;
        # it is recomputed in fp32 from the embeddings (plus the graph's atypicality, a gated
        # sum that does not cancel), so /v1/distances on those embeddings gives exactly the
        # same distances less the image's atypicality.
        self.centers = read_centers(path) if precision == "bf16" else None
        self.info = parse_metadata(read_metadata_props(path), str(path))
        if self.centers is not None:
            self.center_norms = (self.centers.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.outputs = _names(self.compiled.outputs, ALL_OUTPUT_NAMES)

    def io_names(self) -> tuple[list[str], list[str]]:
        return _names(self.compiled.inputs, (INPUT_NAME,)), list(self.outputs)

    def metadata_props(self) -> dict[str, str]:
        return read_metadata_props(self.path)

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        if len(images) == 0:  # OpenVINO refuses empty tensors; the answer is known
            ports = [self.compiled.output(name) for name in self.outputs]
            return [np.zeros((0, *p.get_partial_shape()[1:].to_shape()), _dtype(p)) for p in ports]
        result = request.infer({0: images})  # copies the outputs (share_outputs=False)
        values = {name: result[self.compiled.output(name)] for name in self.outputs}
        if self.centers is not None:
            info = self.info
            values.update(center_scores(
                values["embeddings"], self.centers, info.score_kind, info.true_distances,
                values.get(ATYPICALITY), self.center_norms,
            ))  # fmt: skip
        return [values[name] for name in self.outputs]


def _names(ports, ours: tuple[str, ...]) -> list[str]:
    """One name per port: ours where the port carries it (OpenVINO keeps every tensor name
    a port had in the graph, e.g. the MatMul's output name beside `embeddings`)."""
    names = []
    for port in ports:
        found = [name for name in ours if name in port.get_names()]
        names.append(found[0] if found else port.get_any_name())
    return names


def _dtype(port) -> np.dtype:
    return np.dtype(port.get_element_type().to_dtype())
