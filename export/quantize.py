"""Reduced-precision variants of the exported graph: static int8 (CPU) and fp16 (GPU).

int8 is static QDQ quantization with uint8 activations and int8 per-channel weights: the
form onnxruntime turns into QLinearConv / VNNI kernels on x86 CPUs (signed activations
would need a slower path there). Activation ranges are calibrated on training images,
never on the held-out images that then calibrate the threshold and measure accuracy.
Only the backbone is quantized: the embedding layer and the distance computation stay
float32, so distances to the centers lose no more precision than the embedding has.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from center_embed.contract import CENTERS_INITIALIZER, INPUT_NAME, OUTPUT_NAMES
from center_embed.data import Split
from center_embed.export.calibrate import sample

INT8_CALIBRATION_IMAGES = 512  # activation ranges settle well before this


class _ImageReader:
    """Feeds uint8 training images to the onnxruntime calibrator, a batch at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 64) -> None:
        self.batches = [
            np.ascontiguousarray(images[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def backbone_nodes(proto) -> list[str]:
    """Names of the nodes that feed the embedding matmul's input (the conv backbone).

    The embedding layer is the first MatMul on the way back from the `embeddings` output;
    everything after it (embedding, distances, argmin) stays float.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = producer[OUTPUT_NAMES[0]]  # embeddings
    while node.op_type != "MatMul":
        node = producer[node.input[0]]
    ancestors, stack = set(), [node.input[0]]
    while stack:
        tensor = stack.pop()
        parent = producer.get(tensor)
        if parent is not None and parent.name not in ancestors:
            ancestors.add(parent.name)
            stack.extend(parent.input)
    return [n.name for n in proto.graph.node if n.name in ancestors]


def _name_nodes(proto) -> None:
    """Give every node a unique name: the quantizer selects nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def quantize_int8(proto, train: Split, images: int = 512, seed: int = 0):
    """Static QDQ int8 (QUInt8 activations, QInt8 per-channel weights) of the backbone."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _name_nodes(proto)
    backbone = backbone_nodes(proto)
    calibration = sample(train, images, seed).images
    with tempfile.TemporaryDirectory(prefix="center-embed-int8-") as tmp, _quiet():
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto, str(source))
        quantize_static(
            str(source),
            str(target),
            _ImageReader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=backbone,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        quantized = onnx.load_model(str(target))
    _check_centers(quantized)
    return quantized


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice through the root logger (which prints it); mute that."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _check_centers(proto) -> None:
    if not any(init.name == CENTERS_INITIALIZER for init in proto.graph.initializer):
        raise RuntimeError("quantization dropped the centers initializer")
