"""Request bodies in, uint8 image batches out.

Images arrive either as multipart `files` parts or as a JSON object
`{"images": ["<base64>", ...]}` (strict base64; `data:image/...;base64,` URIs accepted).
Each is decoded by center_embed.imageio.decode_image: only the allowed formats (415 for
the others, told from their header bytes), converted to RGB, shorter side resized to the
model's input size (bilinear, antialiased when shrinking), centre-cropped.

Nothing here lets a request cost much before it is refused:
- the body is read with a deadline (408) and a size bound (413, from Content-Length when
  declared, else as it streams); multipart is parsed as it streams, counting parts (413);
- JSON is parsed (and base64 decoded) in the decode pool, never on the event loop, and
  only when its byte counts show no more values than an accepted request holds (413 for
  more); element types are checked before the schema, naming at most five problems;
- image headers are read first (`probe_parts`): the format, each image's pixels and the
  request's total pixels are checked before anything is decoded (413, 415); a request of
  one image skips the probe, since its decode checks the same header before any pixel;
- then images are decoded one at a time (`decode_part`), so a request holds at most one
  thread of the pool and the caller can stop between images at its deadline.

Headers are read and images decoded in worker processes (service/decode_pool.py: small
images in one pool, large ones in another, at a lower priority), called from the decode
threads: each call ends by its deadline, the sooner of the image's own
limit (decode_timeout_s) and the request's (timeout_s from when its body was in); a worker
past it is killed (504 for that image) and replaced. Called from any other thread (tests,
tools), the same functions decode in the calling process.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from center_embed.imageio import (
    ImageDecodeError,
    ImageFormatError,
    ImageTooLargeError,
    check_size,
    decode_image,
    image_size,
)
from center_embed.service.decode_pool import (
    DecodeFailed,
    DecodeTimeout,
    PoolClosed,
    WorkerDied,
    current_executor,
)
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError, validation_message
from center_embed.service.schemas import ImagesRequest

JSON = "application/json"
MULTIPART = "multipart/form-data"
FILES = "files"
_DATA_URI = re.compile(r"data:[\w.+/-]*(?:;[\w.+=-]+)*;base64,", re.ASCII)
_IMAGES = TypeAdapter(ImagesRequest)
CLOSE = {"Connection": "close"}  # the rest of an unread body must not become a next request
EXTRA_PARTS = 8  # multipart parts not named `files` that a form may carry along
BYTES_PER_VALUE = 64  # JSON text per float, generously (indentation, long exponents)
SPARE_VALUES = 64  # values a JSON body may hold beyond its list's (other keys, ignored)


@dataclass
class ImagePart:
    name: str  # how error messages name it: files[0] ("cat.jpg"), images[2]
    data: bytes
    received: float | None = None  # time.monotonic() when the request's body was all in


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


async def read_body(
    request: Request, limit: int, timeout: float, feed: Callable[[bytes], None] | None = None
) -> bytes:
    """The whole body, refusing it (413) as soon as it is known to pass `limit` bytes and
    (408) when it has not all arrived within `timeout` seconds. With `feed`, each chunk goes
    there as it arrives (a streaming parser) and nothing is kept."""
    too_large = ApiError(
        ErrorCode.BODY_TOO_LARGE, f"request body is larger than {limit} bytes", CLOSE
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                if feed is None:
                    chunks.append(chunk)
                else:
                    feed(chunk)
    except TimeoutError:
        raise ApiError(
            ErrorCode.BODY_TIMEOUT,
            f"the request body did not arrive within {timeout:g} s ({size} bytes came)",
            CLOSE,
        ) from None
    except ClientDisconnect:  # nobody will read the answer; it is not a server error
        raise ApiError(
            ErrorCode.MALFORMED_BODY, "the client left before sending the body"
        ) from None
    return b"".join(chunks)


def vectors_body_limit(max_body: int, max_vectors: int, dim: int) -> int:
    """The largest /v1/distances body worth reading: `max_vectors` vectors of `dim` values
    at a generous BYTES_PER_VALUE each (a 33 MB single vector is refused unread)."""
    return min(max_body, max_vectors * dim * BYTES_PER_VALUE + 1024 * 1024)


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(ErrorCode.MALFORMED_BODY, f"body is not valid JSON: {e}") from None


def check_values_bound(body: bytes, code: ErrorCode, what: str, limit: int, bound: int) -> None:
    """Refuse, from byte counts alone (C speed, nothing built), a JSON body that holds more
    values than `limit` `what` (the most one request may carry) hold, at most `bound`: before
    json.loads builds its objects (4 million `[]` are 300 MB of lists) and before any
    per-element validation. Every value but the first follows a ',' (413 past the bound), or
    opens an array or object: more brackets than the bound, with few commas, are arrays nested
    in one another, a malformed body (400)."""
    commas = body.count(b",")
    if commas > bound:
        raise ApiError(
            code, f"the JSON body holds more than {commas} values; {limit} {what}, the most "
            f"one request may carry, hold at most {bound}",
        )  # fmt: skip
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > bound:
        raise ApiError(
            ErrorCode.MALFORMED_BODY, f"the JSON body opens {brackets} arrays or objects; "
            f"{limit} {what}, the most one request may carry, open at most {bound}",
        )  # fmt: skip


class Problems:
    """Validation problems found by a walk over a parsed body: the first MAX_PROBLEMS kept,
    the rest only counted (never one object per bad element)."""

    MAX_PROBLEMS = 5

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.more = 0

    def one_more(self) -> bool:
        """Count one more problem: True when it is to be kept (then `add` its words)."""
        if len(self.kept) < self.MAX_PROBLEMS:
            return True
        self.more += 1
        return False

    def add(self, where: str, message: str) -> None:
        self.kept.append(f"{where}: {message}")

    def raise_any(self) -> None:
        if self.kept:
            more = [f"and {self.more} more"] if self.more else []
            raise ApiError(ErrorCode.VALIDATION_ERROR, "; ".join([*self.kept, *more]))


def json_field(value: Any, field: str, model: str) -> list:
    """`value[field]` when `value` is an object whose `field` is a non-empty array; else the
    422 that pydantic would give (same words), without validating any element."""
    if not isinstance(value, dict):
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, f"body: Input should be a valid dictionary or instance "
            f"of {model}",
        )  # fmt: skip
    if field not in value:
        raise ApiError(ErrorCode.VALIDATION_ERROR, f"body.{field}: Field required")
    items = value[field]
    if not isinstance(items, list):
        raise ApiError(ErrorCode.VALIDATION_ERROR, f"body.{field}: Input should be a valid list")
    if not items:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            f"body.{field}: List should have at least 1 item after validation, not 0",
        )
    return items


def validate(adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise ApiError(ErrorCode.VALIDATION_ERROR, validation_message(errors)) from None


def too_many(code: ErrorCode, what: str, count: int | str, limit: int) -> ApiError:
    return ApiError(code, f"{count} {what} in one request; at most {limit}")


def bounded_list(
    body: bytes, field: str, model: str, code: ErrorCode, what: str, limit: int, bound: int
) -> list:
    """`body`'s JSON array `field` of at most `limit` `what`: refused from byte counts
    before parsing (check_values_bound), then by length before any element is looked at."""
    check_values_bound(body, code, what, limit, bound)
    items = json_field(load_json(body), field, model)
    if len(items) > limit:
        raise too_many(code, what, len(items), limit)
    return items


# --------------------------------------------------------------------------- JSON base64


def parts_from_json(body: bytes, max_images: int) -> list[ImagePart]:
    """{"images": ["<base64>", ...]} -> parts. Work in proportion to what may be accepted:
    a body that holds more values than `max_images` strings (and their data URIs' commas) is
    refused before it is parsed, a list of more than `max_images` before its elements are
    validated, and at most Problems.MAX_PROBLEMS validation problems are spelled out."""
    bound = 2 * max_images + SPARE_VALUES  # a comma between strings, one in each data URI
    images = bounded_list(body, "images", "ImagesRequest", ErrorCode.TOO_MANY_IMAGES,
                          "images", max_images, bound)  # fmt: skip
    problems = Problems()
    for i, image in enumerate(images):
        if not isinstance(image, str) and problems.one_more():
            problems.add(f"body.images.{i}", "Input should be a valid string")
    problems.raise_any()
    request = validate(_IMAGES, {"images": images})  # the schema's own check, on <= max_images
    names = [f"images[{i}]" for i in range(len(request.images))]
    return [ImagePart(n, b64decode(s, n)) for n, s in zip(names, request.images, strict=True)]


def not_a_number(value: Any) -> str:
    """What a strict number check says of `value` (a string's words as pydantic's)."""
    if isinstance(value, bool):
        return "Input should be a valid number, not a boolean (true/false are not coerced)"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return "Input should be a valid number, unable to parse string as a number"
        return "Input should be a valid number, not a string (strings are not coerced)"
    return "Input should be a valid number"


def _finite_or_nan(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.nan


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


def vectors_from_json(body: bytes, dim: int, max_vectors: int, max_norm: float) -> np.ndarray:
    """{"embeddings": [[D floats], ...]} -> float32 (N, D), every value finite and every
    vector's norm at most `max_norm` (beyond it its distances would overflow float32).

    Strict: every value a JSON number (no string, no true/false: nothing is coerced). Work
    in proportion to what may be accepted, as `parts_from_json`: a body of more values than
    `max_vectors` vectors hold is refused unparsed, a list of more than `max_vectors` before
    its elements are looked at, and at most Problems.MAX_PROBLEMS problems are spelled out."""
    bound = max_vectors * (dim + 1) + SPARE_VALUES  # per vector: its '[' and dim - 1 commas, ','
    vectors = bounded_list(body, "embeddings", "DistancesRequest", ErrorCode.TOO_MANY_VECTORS,
                           "vectors", max_vectors, bound)  # fmt: skip
    problems = Problems()
    for i, vector in enumerate(vectors):
        if not isinstance(vector, list):
            if problems.one_more():
                problems.add(f"body.embeddings.{i}", "Input should be a valid list")
            continue
        for j, value in enumerate(vector):
            if type(value) is not float and type(value) is not int and problems.one_more():
                problems.add(f"body.embeddings.{i}.{j}", not_a_number(value))
    problems.raise_any()
    for i, vector in enumerate(vectors):
        if len(vector) != dim:
            raise ApiError(
                ErrorCode.VALIDATION_ERROR,
                f"embeddings[{i}] has {len(vector)} values; the model's embedding dim is {dim}",
            )
    with np.errstate(over="ignore"):
        try:
            array = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim)
        except OverflowError:  # an integer beyond float's range: not finite either
            array = np.array([[_finite_or_nan(v) for v in row] for row in vectors], np.float32)
    bad = np.flatnonzero(~np.isfinite(array).all(1))
    if len(bad):
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            f"embeddings[{bad[0]}] has a value that is not finite (NaN, infinite, or beyond "
            "float32's range)",
        )
    norms = np.sqrt((array.astype(np.float64) ** 2).sum(1))
    far = np.flatnonzero(norms > max_norm)
    if len(far):
        raise ApiError(
            ErrorCode.OUT_OF_RANGE,
            f"embeddings[{far[0]}] has norm {norms[far[0]]:.3g}: its squared distances to the "
            f"centers would overflow float32 (norms up to {max_norm:.3g} are accepted)",
        )
    return array


# --------------------------------------------------------------------------- multipart


class _Parts:
    """Collects multipart parts as the body streams in (bounded by the body limit), and
    refuses a body of too many parts when the one past the bound begins."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.max_parts = max_files + EXTRA_PARTS
        self.parts = 0
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
        self.parts += 1
        if self.parts > self.max_parts:
            raise too_many(
                ErrorCode.TOO_MANY_PARTS, "multipart parts", f"more than {self.max_parts}",
                self.max_parts,
            )  # fmt: skip
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


async def parts_from_multipart(
    request: Request, max_body: int, timeout: float, max_images: int
) -> list[ImagePart]:
    """The `files` parts of a multipart body, parsed chunk by chunk as it arrives."""
    _, params = parse_options_header(request.headers["content-type"])
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(ErrorCode.MALFORMED_BODY, "multipart body without a boundary parameter")
    parts = _Parts(max_images)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        await read_body(request, max_body, timeout, parser.write)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(ErrorCode.MALFORMED_BODY, f"malformed multipart body: {e}", CLOSE) from None
    if not parts.files:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, f"no `{FILES}` parts: send each image as a part named files"
        )
    return parts.files


# --------------------------------------------------------------------------- both


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may be: formats, pixels of one image, pixels of them all."""

    formats: Collection[str]
    max_pixels: int
    max_request_pixels: int


async def image_parts(
    request: Request, max_body: int, timeout: float, max_images: int, pool: Any
) -> list[ImagePart]:
    """The images of a request, still encoded: 415, 413, 408, 400 or 422 when they are not.
    JSON is parsed in `pool` (an Executor), off the event loop."""
    kind = require_media_type(request, (MULTIPART, JSON))
    if kind == MULTIPART:
        parts = await parts_from_multipart(request, max_body, timeout, max_images)
        received = time.monotonic()
    else:
        body = await read_body(request, max_body, timeout)
        received = time.monotonic()
        loop = asyncio.get_running_loop()
        parts = await loop.run_in_executor(pool, parts_from_json, body, max_images)
    for part in parts:  # the request's deadline (timeout_s) starts about now
        part.received = received
    return parts


def require_nonempty(parts: list[ImagePart]) -> None:
    for part in parts:
        if not part.data:
            raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name} is empty")


def probe_parts(parts: list[ImagePart], limits: ImageLimits) -> int:
    """Read every part's header (not its pixels): refuse an empty part, a format outside
    the allowlist, an image over max_pixels or a request over max_request_pixels before
    anything is decoded. Returns the request's total pixels. Runs in a worker thread."""
    require_nonempty(parts)
    executor = current_executor()
    if executor is not None and executor.pool is not None and parts:
        deadline, limit = _deadline(parts[0], executor)
        with _pool_errors(parts[0], "reading the image headers", limit):
            sizes = executor.pool.probe(
                [part.data for part in parts], limits.max_pixels, limits.formats, deadline
            )
    else:
        sizes = [_probe_here(part.data, limits) for part in parts]
    total = 0
    for part, size in zip(parts, sizes, strict=False):  # sizes stop at the first failure
        with _as_api_errors(part):
            if isinstance(size, Exception):
                raise size
        width, height = size
        total += width * height
    if total > limits.max_request_pixels:
        raise ApiError(
            ErrorCode.TOO_MANY_PIXELS,
            f"the images hold {total} pixels in all; at most {limits.max_request_pixels} "
            "per request",
        )
    return total


def _probe_here(data: bytes, limits: ImageLimits) -> tuple[int, int] | Exception:
    try:
        width, height = image_size(data, limits.formats)
        check_size(width, height, limits.max_pixels)
    except Exception as e:
        return e
    return width, height


def decode_part(part: ImagePart, size: int, limits: ImageLimits) -> np.ndarray:
    """One part as uint8 (size, size, 3), or the ApiError naming it. Runs in a worker thread
    of the decode pool (then in a decode process: module docstring)."""
    executor = current_executor()
    if executor is None or executor.pool is None:
        with _as_api_errors(part):
            return decode_image(part.data, size, limits.max_pixels, limits.formats)
    deadline, limit = _deadline(part, executor)
    with _pool_errors(part, "decoding", limit), _as_api_errors(part):
        return executor.pool.decode(part.data, size, limits.max_pixels, limits.formats, deadline)


def _deadline(part: ImagePart, executor: Any) -> tuple[float, float]:
    """(deadline, what it bounds in s): the image's own limit, or the request's if sooner."""
    now = time.monotonic()
    deadline, limit = now + executor.image_timeout_s, executor.image_timeout_s
    if part.received is not None and part.received + executor.request_timeout_s < deadline:
        deadline, limit = part.received + executor.request_timeout_s, executor.request_timeout_s
    return deadline, limit


@contextlib.contextmanager
def _pool_errors(part: ImagePart, what: str, limit: float) -> Iterator[None]:
    """The decode pool's own failures as ApiErrors naming the part."""
    try:
        yield
    except DecodeTimeout:
        raise ApiError(
            ErrorCode.TIMEOUT, f"{part.name}: {what} took longer than {limit:g} s; stopped"
        ) from None
    except WorkerDied as e:
        raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name}: cannot decode ({e})") from None
    except PoolClosed:
        raise ApiError(ErrorCode.SHUTTING_DOWN, "the service is shutting down") from None


@contextlib.contextmanager
def _as_api_errors(part: ImagePart) -> Iterator[None]:
    """imageio's errors (and whatever else Pillow raises on junk) as ApiErrors naming the part."""
    try:
        yield
    except ApiError:
        raise
    except ImageFormatError as e:
        raise ApiError(ErrorCode.UNSUPPORTED_IMAGE_FORMAT, f"{part.name}: {e}") from None
    except ImageTooLargeError as e:
        raise ApiError(ErrorCode.IMAGE_TOO_LARGE, f"{part.name}: {e}") from None
    except ImageDecodeError as e:
        raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name}: {e}") from None
    except DecodeFailed as e:  # what the decoder raised, as its repr, from a decode process
        raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name}: cannot decode ({e})") from None
    except (DecodeTimeout, WorkerDied, PoolClosed):
        raise
    except Exception as e:  # Pillow's plugins raise more than they document on junk
        raise ApiError(ErrorCode.BAD_IMAGE, f"{part.name}: cannot decode ({e!r})") from None
