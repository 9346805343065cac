"""Request bodies in, uint8 image batches out.

Images arrive either as multipart `files` parts or as a JSON object
`{"images": ["<base64>", ...]}` (strict base64; `data:image/...;base64,` URIs accepted).
Each is decoded by `OnnxModel.decode` (center_embed.imageio): any format Pillow reads,
converted to RGB, shorter side resized to the model's input size (bilinear, antialiased
when shrinking), centre-cropped. Pillow's decompression-bomb guard stays on, and images
with more than `max_pixels` pixels are refused from their header, before decoding.

Decoding runs in a thread pool, never on the event loop.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from center_embed.imageio import ImageDecodeError, ImageTooLargeError
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError, validation_message
from center_embed.service.schemas import DistancesRequest, ImagesRequest

JSON = "application/json"
MULTIPART = "multipart/form-data"
FILES = "files"
_DATA_URI = re.compile(r"data:[\w.+/-]*(?:;[\w.+=-]+)*;base64,", re.ASCII)
_IMAGES = TypeAdapter(ImagesRequest)
_VECTORS = TypeAdapter(DistancesRequest)


@dataclass
class ImagePart:
    name: str  # how error messages name it: files[0] ("cat.jpg"), images[2]
    data: bytes


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_media_type(request: Request, allowed: tuple[str, ...]) -> str:
    found = media_type(request)
    if found not in allowed:
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {found or '(none)'} is not accepted here; send {' or '.join(allowed)}",
        )
    return found


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to pass `limit` bytes."""
    too_large = ApiError(ErrorCode.BODY_TOO_LARGE, f"request body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # nobody will read the answer; it is not a server error
        raise ApiError(
            ErrorCode.MALFORMED_BODY, "the client left before sending the body"
        ) from None
    return b"".join(chunks)


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(ErrorCode.MALFORMED_BODY, f"body is not valid JSON: {e}") from None


def validate(adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise ApiError(ErrorCode.VALIDATION_ERROR, validation_message(errors)) from None


def too_many(code: ErrorCode, what: str, count: int | str, limit: int) -> ApiError:
    return ApiError(code, f"{count} {what} in one request; at most {limit}")


# --------------------------------------------------------------------------- JSON base64


def parts_from_json(body: bytes, max_images: int) -> list[ImagePart]:
    request = validate(_IMAGES, load_json(body))
    if len(request.images) > max_images:
        raise too_many(ErrorCode.TOO_MANY_IMAGES, "images", len(request.images), max_images)
    names = [f"images[{i}]" for i in range(len(request.images))]
    return [ImagePart(n, b64decode(s, n)) for n, s in zip(names, request.images, strict=True)]


def b64decode(text: str, where: str) -> bytes:
    """Strict base64 (no whitespace, right padding), optionally inside a data URI."""
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end() :]
    elif text.startswith("data:"):
        raise ApiError(
            ErrorCode.BAD_BASE64, f"{where}: a data URI must be data:<type>;base64,<data>"
        )
    try:  # strict: the base64 alphabet only, padding exactly right, nothing after it
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise ApiError(ErrorCode.BAD_BASE64, f"{where}: not valid base64 ({e})") from None


def vectors_from_json(body: bytes, dim: int, max_vectors: int) -> np.ndarray:
    """{"embeddings": [[D floats], ...]} -> float32 (N, D), every value finite."""
    request = validate(_VECTORS, load_json(body))
    vectors = request.embeddings
    if len(vectors) > max_vectors:
        raise too_many(ErrorCode.TOO_MANY_VECTORS, "vectors", len(vectors), max_vectors)
    for i, vector in enumerate(vectors):
        if len(vector) != dim:
            raise ApiError(
                ErrorCode.VALIDATION_ERROR,
                f"embeddings[{i}] has {len(vector)} values; the model's embedding dim is {dim}",
            )
    with np.errstate(over="ignore"):
        array = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim)
    bad = np.flatnonzero(~np.isfinite(array).all(1))
    if len(bad):
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            f"embeddings[{bad[0]}] has a value that is not finite (NaN, infinite, or beyond "
            "float32's range)",
        )
    return array


# --------------------------------------------------------------------------- multipart


class _Parts:
    """Collects multipart parts in memory (the body is in memory already, bounded)."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[ImagePart] = []
        self._header_field, self._header_value = b"", b""
        self._disposition = b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_part_data": lambda data, start, end: self._data.append(data[start:end]),
            "on_part_end": self._end,
            "on_header_field": self._field,
            "on_header_value": self._value,
            "on_header_end": self._header_end,
        }

    def _begin(self) -> None:
        self._disposition, self._data = b"", []

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field, self._header_value = b"", b""

    def _end(self) -> None:
        _, options = parse_options_header(self._disposition.decode("latin-1"))
        if options.get(b"name", b"").decode("latin-1") != FILES:
            return  # other fields are not ours; a form may carry them
        if len(self.files) >= self.max_files:
            raise too_many(
                ErrorCode.TOO_MANY_IMAGES, "images", f"more than {self.max_files}", self.max_files
            )
        name = f"{FILES}[{len(self.files)}]"
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")[:100]
            name += f" ({json.dumps(filename, ensure_ascii=False)})"
        self.files.append(ImagePart(name, b"".join(self._data)))


def parts_from_multipart(body: bytes, content_type: str, max_images: int) -> list[ImagePart]:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(ErrorCode.MALFORMED_BODY, "multipart body without a boundary parameter")
    parts = _Parts(max_images)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(ErrorCode.MALFORMED_BODY, f"malformed multipart body: {e}") from None
    if not parts.files:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, f"no `{FILES}` parts: send each image as a part named files"
        )
    return parts.files


# --------------------------------------------------------------------------- both


async def image_parts(request: Request, max_body: int, max_images: int) -> list[ImagePart]:
    """The images of a request, still encoded: 415, 413, 400 or 422 when they are not."""
    kind = require_media_type(request, (MULTIPART, JSON))
    body = await read_body(request, max_body)
    if kind == JSON:
        return parts_from_json(body, max_images)
    return parts_from_multipart(body, request.headers["content-type"], max_images)


def decode_parts(model: Any, parts: list[ImagePart], max_pixels: int) -> np.ndarray:
    """Decode every part into one uint8 (N, H, W, 3) batch; runs in a worker thread."""
    h, w = model.info.input_size
    batch = np.empty((len(parts), h, w, 3), np.uint8)
    for i, part in enumerate(parts):
        if not part.data:
            raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name} is empty")
        try:
            batch[i] = model.decode(part.data, max_pixels)
        except ImageTooLargeError as e:
            raise ApiError(ErrorCode.IMAGE_TOO_LARGE, f"{part.name}: {e}") from None
        except ImageDecodeError as e:
            raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name}: {e}") from None
        except Exception as e:  # Pillow's plugins raise more than they document on junk
            raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name}: cannot decode ({e!r})") from None
    return batch
