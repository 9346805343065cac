"""An exported model as a Triton Inference Server model repository (onnxruntime backend):

    DIR/center_embed/config.pbtxt
    DIR/center_embed/1/model.onnx

laid out as Triton's model repository documentation specifies, so Triton (and KServe's
Triton runtime) serves the file with no code of ours: the same names, datatypes and shapes
our own /v2 routes answer with (center_embed.contract: PROTOCOL_MODEL_NAME, protocol_version,
PROTOCOL_DATATYPES).

config.pbtxt is the ModelConfig protobuf in text format. Triton owns the batch dimension
(max_batch_size > 0), so each tensor's `dims` are its ONNX shape without the leading N; an
output of shape [N] (labels, min_distances) becomes `dims: [1]` with `reshape: { shape: [] }`,
as the documentation requires for a tensor whose batch dimension is its whole shape.
Dynamic batching coalesces requests as our micro-batcher does; instance groups choose CPU or
GPU (the onnxruntime backend runs KIND_GPU instances on its CUDA execution provider) and,
optionally, the TensorRT execution accelerator in FP16 or FP32.

It reads the ONNX file with `onnx` (the export extra). Triton itself does not run on these
machines: tests check the file with the ModelConfig protobuf shipped in tritonclient[grpc].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from center_embed import __version__
from center_embed.contract import (
    ATYPICALITY,
    INPUT_NAME,
    OUTPUT_NAMES,
    PROTOCOL_DATATYPES,
    PROTOCOL_MODEL_NAME,
    is_model_outputs,
    protocol_version,
)
from center_embed.errors import UserError
from center_embed.fileio import atomic_copy, atomic_write_text, sha256_file

CONFIG_NAME = "config.pbtxt"
MODEL_FILENAME = "model.onnx"
TENSORRT_WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 64  # the service's CENTER_EMBED_MAX_BATCH default
    max_queue_delay_us: int = 2000  # the service's CENTER_EMBED_MAX_WAIT_MS default, 2 ms
    instances: int = 1
    device: Literal["cpu", "gpu"] = "cpu"
    tensorrt: Literal["fp16", "fp32"] | None = None  # the TensorRT accelerator (GPU only)

    def check(self) -> None:
        if self.max_batch_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise UserError("Triton max batch size and instance count must be at least 1")
        if self.tensorrt is not None and self.device != "gpu":
            raise UserError("the TensorRT accelerator runs on GPU instances: add --triton-gpu")


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str  # TYPE_UINT8, TYPE_FP32, ...
    dims: list[int]  # without the batch dimension; -1 where the ONNX dim is symbolic
    reshape_to_scalar: bool = False  # an [N] tensor: dims [1], reshaped to [] for the model


def tensor_specs(proto, onnx_path: str | Path) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """The model's inputs and outputs as Triton declares them, from the ONNX ModelProto."""
    import onnx

    graph = proto.graph
    inputs = [_spec(v, onnx) for v in graph.input if v.name == INPUT_NAME]
    outputs = [_spec(v, onnx) for v in graph.output]
    names = [t.name for t in outputs]
    if [t.name for t in inputs] != [INPUT_NAME] or not is_model_outputs(names):
        raise UserError(
            f"{onnx_path} has outputs {names}; expected input {INPUT_NAME!r} and outputs "
            f"{list(OUTPUT_NAMES)} (and {ATYPICALITY!r}): not exported by center-embed"
        )
    return inputs, outputs


def _spec(value, onnx) -> TritonTensor:
    tensor_type = value.type.tensor_type
    numpy_type = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    if not dims or dims[0] != -1:
        raise UserError(f"{value.name} has shape {dims}: its first dimension must be the batch")
    if len(dims) == 1:
        return TritonTensor(value.name, _data_type(numpy_type, value.name), [1], True)
    return TritonTensor(value.name, _data_type(numpy_type, value.name), dims[1:])


def _data_type(numpy_type, name: str) -> str:
    try:
        return "TYPE_" + PROTOCOL_DATATYPES[numpy_type.name]
    except KeyError:
        raise UserError(f"{name} has element type {numpy_type}, which we do not map") from None


# --------------------------------------------------------------------------- config.pbtxt


def render_config(
    name: str,
    inputs: list[TritonTensor],
    outputs: list[TritonTensor],
    options: TritonOptions,
    source: str = "",
) -> str:
    """config.pbtxt: ModelConfig in protobuf text format."""
    kind = "KIND_GPU" if options.device == "gpu" else "KIND_CPU"
    lines = [
        f"# Written by center-embed {__version__}{' from ' + source if source else ''}.",
        "# Triton model configuration (protobuf text format, ModelConfig).",
        f'name: "{name}"',
        'backend: "onnxruntime"',
        'platform: "onnxruntime_onnx"',
        f'default_model_filename: "{MODEL_FILENAME}"',
        f"max_batch_size: {options.max_batch_size}",
        "input [",
        ",\n".join(_tensor(t, "  format: FORMAT_NHWC") for t in inputs),
        "]",
        "output [",
        ",\n".join(_tensor(t) for t in outputs),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
        "instance_group [",
        f"  {{ count: {options.instances} kind: {kind} }}",
        "]",
    ]
    if options.tensorrt is not None:
        lines += [
            "optimization { execution_accelerators {",
            "  gpu_execution_accelerator: [ {",
            '    name: "tensorrt"',
            f'    parameters {{ key: "precision_mode" value: "{options.tensorrt.upper()}" }}',
            f'    parameters {{ key: "max_workspace_size_bytes" value: '
            f'"{TENSORRT_WORKSPACE_BYTES}" }}',
            "  } ]",
            "} }",
        ]
    return "\n".join(lines) + "\n"


def _tensor(tensor: TritonTensor, extra: str = "") -> str:
    body = [
        f'  name: "{tensor.name}"',
        f"  data_type: {tensor.data_type}",
        *([extra] if extra else []),
        f"  dims: [ {', '.join(str(d) for d in tensor.dims)} ]",
    ]
    if tensor.reshape_to_scalar:
        body.append("  reshape: { shape: [ ] }")
    return "  {\n" + "\n".join("  " + line for line in body) + "\n  }"


# --------------------------------------------------------------------------- the repository


def write_triton_repository(
    onnx_path: str | Path,
    repository: str | Path,
    options: TritonOptions | None = None,
    name: str = PROTOCOL_MODEL_NAME,
) -> Path:
    """Write repository/<name>/config.pbtxt and repository/<name>/<version>/model.onnx
    (each file atomically); return the model's folder. Other models in the repository are
    left alone; this model's config and this version's file are replaced."""
    import onnx

    options = options or TritonOptions()
    options.check()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"model not found: {onnx_path}")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = tensor_specs(proto, onnx_path)
    version = protocol_version(proto.model_version)
    folder = Path(repository) / name
    source = f"{onnx_path.name} (sha256 {sha256_file(onnx_path)[:16]})"
    (folder / version).mkdir(parents=True, exist_ok=True)
    atomic_copy(onnx_path, folder / version / MODEL_FILENAME)
    atomic_write_text(folder / CONFIG_NAME, render_config(name, inputs, outputs, options, source))
    return folder
