"""The Open Inference Protocol's request and response bodies (KServe / Triton "v2" REST),
with the binary tensor data extension: parsing and checking in, encoding out.

An inference request is a JSON object, optionally followed by the raw bytes of its binary
tensors; the `Inference-Header-Content-Length` header then gives the JSON object's length:

    {"id": "7", "inputs": [{"name": "images", "datatype": "UINT8", "shape": [N, H, W, 3],
                            "parameters": {"binary_data_size": N*H*W*3}}],
     "outputs": [{"name": "labels", "parameters": {"binary_data": true}}]}
    <N*H*W*3 bytes, row-major, little-endian>

The JSON itself is refused unparsed when its byte counts show more values than an accepted
request holds, and its lists (inputs, outputs, a shape) when longer than any accepted one,
before their elements are validated: parsing costs in proportion to what may be accepted.
Every size is checked against the header before the work it implies: the shape against the
model and `max_images`, the declared byte size against shape × element size, the bytes that
follow the JSON against the declared sizes; only then is a tensor made (zero-copy over the
body for binary data). Bad requests raise ApiError (service/error_codes.py). No web framework
is imported here: service/routes/v2.py reads the body and answers.

Specs: kserve/kserve docs/predict-api/v2/required_api.md (the protocol) and
triton-inference-server/server docs/protocol/extension_binary_data.md (the extension).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictInt, TypeAdapter, ValidationError

from center_embed.contract import INPUT_NAME, OUTPUT_NAMES, PROTOCOL_DATATYPES
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError, validation_message

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
INPUT_DATATYPE = "UINT8"
# Parameters we cannot honour: refused by name rather than silently ignored.
UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported by this server",
    "classification": "the classification extension is not supported; request `labels`",
}

Parameters = dict[str, Any]
MAX_TENSORS = 16  # inputs or outputs a request may list (the model has one input, <= 5 outputs)
MAX_DIMS = 8  # dimensions of a shape (the input has 4)
SPARE_VALUES = 256  # JSON values beyond the tensors' (id, parameters, names)


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = None  # a (nested or flat) JSON array; absent when sent as binary data


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


_REQUEST = TypeAdapter(InferenceRequest)
_FLAG = TypeAdapter(StrictBool)


def bad(message: str) -> ApiError:
    return ApiError(ErrorCode.BAD_TENSOR, message)


@dataclass(frozen=True)
class ImagesInput:
    """What a request's `images` input will be, known from its header alone."""

    shape: tuple[int, int, int, int]  # (N, H, W, 3)
    binary: memoryview | None  # the tensor's bytes after the JSON header; None: JSON data
    data: Any  # the JSON array when not binary

    @property
    def count(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class ParsedRequest:
    id: str | None
    images: ImagesInput
    outputs: list[tuple[str, bool]]  # (output name, as binary data), in answer order


# --------------------------------------------------------------------------- requests in


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header, the binary tensor bytes after it) by Inference-Header-Content-Length."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise bad(
            f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON header's length, "
            f"between 1 and the body's {len(body)} bytes"
        )
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def parse_request(
    body: bytes,
    header_length: str | None,
    input_size: tuple[int, int],
    max_images: int,
    output_names: tuple[str, ...] = OUTPUT_NAMES,
) -> ParsedRequest:
    """Check an inference request against the model (input `images`, UINT8 (N, H, W, 3),
    N <= max_images; outputs among `output_names`, the model file's) and split out its
    tensor; no tensor is built yet (see `images_array`)."""
    header, binary = split_body(body, header_length)
    bound = _values_bound(input_size, max_images, len(output_names))
    count = header.count(b",") + header.count(b"[") + header.count(b"{")
    if count > bound:  # refused before json.loads builds millions of objects
        raise bad(f"the JSON header holds about {count} values (commas and brackets); a "
                  f"request of at most {max_images} images holds at most {bound}")  # fmt: skip
    raw = _load_json(header)
    _check_list_lengths(raw)
    try:
        request = _REQUEST.validate_python(raw)
    except ValidationError as e:
        raise bad(f"not an inference request: {validation_message(list(e.errors()))}") from None
    images = _images_input(request.inputs, binary, input_size, max_images)
    return ParsedRequest(request.id, images, _requested_outputs(request, output_names))


def _values_bound(input_size: tuple[int, int], max_images: int, outputs: int) -> int:
    """The most values (commas and brackets) the JSON header of an accepted request holds:
    `max_images` images as nested JSON arrays (each number and each row after a comma, each
    row and image opening a bracket), the outputs asked for, and some to spare."""
    h, w = input_size
    return max_images * (h * w * 4 + 2 * h + 4) + 8 * outputs + SPARE_VALUES


def _check_list_lengths(raw: Any) -> None:
    """Refuse lists longer than any accepted request has before pydantic validates their
    elements (one error object for each bad one: a million `null` inputs were 1.4 GB)."""
    if not isinstance(raw, dict):
        return  # pydantic says so, in one error
    for key, most in (("inputs", MAX_TENSORS), ("outputs", MAX_TENSORS)):
        items = raw.get(key)
        if isinstance(items, list) and len(items) > most:
            raise bad(f"{len(items)} {key} in the request; the model has {most} at most")
    for i, given in enumerate(raw.get("inputs") or []):
        shape = given.get("shape") if isinstance(given, dict) else None
        if isinstance(shape, list) and len(shape) > MAX_DIMS:
            raise bad(f"inputs[{i}] has a shape of {len(shape)} dimensions; at most {MAX_DIMS}")


def _load_json(header: bytes) -> Any:
    try:
        return json.loads(header)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(ErrorCode.MALFORMED_BODY, f"the request's JSON is not valid: {e}") from None


def _images_input(
    inputs: list[RequestInput], binary: memoryview, input_size: tuple[int, int], max_images: int
) -> ImagesInput:
    names = [i.name for i in inputs]
    if names != [INPUT_NAME]:
        raise bad(f"inputs {names}: the model takes exactly one input, {INPUT_NAME!r}")
    given = inputs[0]
    _refuse_unsupported(given.parameters, f"input {INPUT_NAME!r}")
    if given.datatype != INPUT_DATATYPE:
        raise bad(
            f"input {INPUT_NAME!r} has datatype {given.datatype!r}; the model takes "
            f"{INPUT_DATATYPE} (pixels 0-255)"
        )
    h, w = input_size
    shape = tuple(given.shape)
    if len(shape) != 4 or shape[1:] != (h, w, 3) or shape[0] < 1:
        raise bad(f"input {INPUT_NAME!r} has shape {list(shape)}; the model takes [N, {h}, {w}, 3] "
                  "with N >= 1 (RGB, resized and centre-cropped)")  # fmt: skip
    if shape[0] > max_images:
        raise ApiError(
            ErrorCode.TOO_MANY_IMAGES, f"{shape[0]} images in one request; at most {max_images}"
        )
    nbytes = math.prod(shape)  # UINT8: one byte per element
    size = given.parameters.get("binary_data_size")
    if size is None:
        if len(binary):
            raise bad(f"{len(binary)} bytes follow the JSON header but no input declares "
                      "binary_data_size")  # fmt: skip
        if given.data is None:
            raise bad(f"input {INPUT_NAME!r} has neither data nor binary_data_size")
        return ImagesInput(shape, None, given.data)  # type: ignore[arg-type]
    if type(size) is not int or size != nbytes:
        raise bad(f"input {INPUT_NAME!r} declares binary_data_size {size!r}; shape "
                  f"{list(shape)} of {INPUT_DATATYPE} is {nbytes} bytes")  # fmt: skip
    if len(binary) != nbytes:
        raise bad(f"{len(binary)} bytes follow the JSON header; the binary inputs declare "
                  f"{nbytes}")  # fmt: skip
    if given.data is not None:
        raise bad(f"input {INPUT_NAME!r} has both data and binary_data_size")
    return ImagesInput(shape, binary, None)  # type: ignore[arg-type]


def _requested_outputs(
    request: InferenceRequest, output_names: tuple[str, ...]
) -> list[tuple[str, bool]]:
    everything_binary = _flag(request.parameters, "binary_data_output", "the request")
    if request.outputs is None:
        return [(name, everything_binary) for name in output_names]
    names = [o.name for o in request.outputs]
    unknown = [n for n in names if n not in output_names]
    if unknown:
        raise bad(f"unknown output(s) {unknown}; the model's outputs are {list(output_names)}")
    if len(set(names)) != len(names):
        raise bad(f"outputs {names} name an output more than once")
    requested = []
    for output in request.outputs:
        where = f"output {output.name!r}"
        _refuse_unsupported(output.parameters, where)
        binary = everything_binary
        if "binary_data" in output.parameters:  # overrides binary_data_output for this one
            binary = _flag(output.parameters, "binary_data", where)
        requested.append((output.name, binary))
    return requested


def _flag(parameters: Parameters, name: str, where: str) -> bool:
    value = parameters.get(name, False)
    try:
        return _FLAG.validate_python(value)
    except ValidationError:
        raise bad(f"{where}: parameter {name} must be true or false, not {value!r}") from None


def _refuse_unsupported(parameters: Parameters, where: str) -> None:
    for name, reason in UNSUPPORTED_PARAMETERS.items():
        if name in parameters:
            raise bad(f"{where}: {reason}")


def images_array(images: ImagesInput) -> np.ndarray:
    """The images as uint8 (N, H, W, 3): a view of the body for binary data; JSON arrays
    (flat or nested) are checked for their element count, integer type and 0-255 range."""
    if images.binary is not None:
        return np.frombuffer(images.binary, np.uint8).reshape(images.shape)
    expected = math.prod(images.shape)
    values = None
    # A flat array holds every element, a nested one N rows: anything else is refused before
    # numpy walks it.
    if isinstance(images.data, list) and len(images.data) in (expected, images.count):
        try:
            values = np.asarray(images.data)
        except (ValueError, TypeError, OverflowError):  # ragged, or not numbers
            values = None
    if values is None or values.dtype.kind not in "iu" or values.size != expected:
        raise bad(f"input {INPUT_NAME!r}: data must be {expected} integers (shape "
                  f"{list(images.shape)}), flat or nested")  # fmt: skip
    if values.size and (values.min() < 0 or values.max() > 255):
        raise bad(f"input {INPUT_NAME!r}: {INPUT_DATATYPE} values must lie in 0-255")
    return values.astype(np.uint8).reshape(images.shape)


# --------------------------------------------------------------------------- answers out


def datatype(dtype: np.dtype) -> str:
    return PROTOCOL_DATATYPES[np.dtype(dtype).name]


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: list[tuple[str, bool]],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, followed by the binary outputs' bytes in
    the order of the JSON's outputs when any output is binary."""
    described, blobs = [], []
    for name, binary in requested:
        value = outputs[name]
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatype(value.dtype),
            "shape": list(value.shape),
        }
        if binary:
            little = np.ascontiguousarray(value, value.dtype.newbyteorder("<"))
            blobs.append(little.tobytes())
            tensor["parameters"] = {"binary_data_size": little.nbytes}
        else:
            tensor["data"] = value.ravel().tolist()
        described.append(tensor)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = described
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": JSON_TYPE}
    headers = {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}
    return b"".join([header, *blobs]), headers
