"""The centers of an exported model, read from its ONNX file without the onnx package.

The exporter stores the centers as the float32 initializer `centers` (C, D), which the
distance matmul reads. /v1/distances and /v1/centers need them as numpy, and the serving
install has onnxruntime but neither onnx nor torch, and onnxruntime does not hand out
initializers. ONNX files are protocol buffers, and the few fields we need have been fixed
since ONNX 1.0, so a forty-line wire-format reader suffices:

    ModelProto.graph = 7  ->  GraphProto.initializer = 5 (repeated TensorProto)
    TensorProto: dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9,
                 data_location = 14 (1: external data, which our files never use)

The service cross-checks what it read against the graph's own distances at warm-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from center_embed.errors import UserError

CENTERS = "centers"
_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto.DataType


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value) for each field of one message; value is an int
    for varints and a memoryview for length-delimited and fixed-width fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = data[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor(message: memoryview) -> np.ndarray:
    dims: list[int] = []
    dtype, floats, raw = 1, None, None
    for number, wire, value in _fields(message):
        if number == 1:  # dims: packed (wire 2) or one varint per field
            if wire == 2:
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == 2:
            dtype = value
        elif number == 4 and wire == 2:
            floats = np.frombuffer(value, "<f4")
        elif number == 9:
            raw = value
        elif number == 14 and value == 1:
            raise ValueError("the centers are stored as external data")
    if dtype not in _DTYPES:
        raise ValueError(f"the centers have unsupported data type {dtype}")
    if raw is not None:
        array = np.frombuffer(raw, np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    elif floats is not None and dtype == 1:
        array = floats
    else:
        raise ValueError("the centers tensor holds no data")
    return array.reshape(dims).astype(np.float32)


def read_centers(path: str | Path, name: str = CENTERS) -> np.ndarray:
    """The initializer `name` of an ONNX file as float32 (C, D); UserError if absent."""
    data = memoryview(Path(path).read_bytes())
    try:
        for number, _, graph in _fields(data):
            if number != 7:
                continue
            for field, _, tensor in _fields(graph):
                if field == 5 and _tensor_name(tensor) == name:
                    centers = _tensor(tensor)
                    if centers.ndim != 2:
                        raise ValueError(f"the centers have shape {centers.shape}, not (C, D)")
                    return centers
    except (ValueError, IndexError) as e:
        raise UserError(f"{path}: cannot read the {name!r} initializer ({e})") from None
    raise UserError(f"{path} has no {name!r} initializer: not exported by center-embed")


def _tensor_name(message: memoryview) -> str | None:
    for number, _, value in _fields(message):
        if number == 8:
            return bytes(value).decode("utf-8", "replace")
    return None
