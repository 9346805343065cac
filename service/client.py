"""A Python client for the center-embed HTTP service (needs httpx, numpy and Pillow).

    from center_embed.service.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        vectors = client.embed(["cat.jpg", "ship.png"])       # float32 (2, D)
        results = client.classify(["cat.jpg"], top_k=3)        # [Classification]
        results = client.distances(vectors)                    # same, no images

    with Client("http://127.0.0.1:8000", api_key=ADMIN_KEY) as admin:
        admin.enroll("zebra", ["z1.jpg", "z2.jpg"])            # a new class, no retraining
        admin.remove("zebra")

Images may be paths, bytes (an encoded file), PIL images or numpy arrays (see
`Client` for the rules on arrays and image modes). Files and bytes are sent as they are;
pixels are sent as PNG (lossless). More images than the service takes in one request
(its max_images and max_body_bytes, read once from /v1/model) are sent as several
requests, and the answers come back in the order the images were given. A server error
names an image by the name the caller gave: its path as given, or `image[i]` (its place
in the call) for in-memory inputs.
A server error is raised as a `ServiceError` subclass (one per HTTP
status) carrying the server's code (an `ErrorCode`, service/error_codes.py) and message.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from center_embed.service.error_codes import ErrorCode

# --------------------------------------------------------------------------- errors


class ServiceError(Exception):
    """The service answered with an error (or could not be reached: status 0).

    `code` is the server's ErrorCode (service/error_codes.py: a str enum, so it compares
    equal to "bad_image" as well as to ErrorCode.BAD_IMAGE), or a plain str for what the
    table does not list: the client's own connection_failed, client_timeout, and http_error
    for an answer that is not the service's JSON error (a proxy's page, say)."""

    def __init__(self, status: int, code: ErrorCode | str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status, self.code, self.message = status, code, message


class ConnectionFailed(ServiceError):
    """No answer: the service could not be reached, or did not answer in time."""


class BadRequest(ServiceError):
    """400."""


class Unauthorized(ServiceError):
    """401."""


class Forbidden(ServiceError):
    """403: the enrolment routes are off (the service has no admin keys)."""


class Conflict(ServiceError):
    """409: the change would remove the last class, or add images to a trained class."""


class PayloadTooLarge(ServiceError):
    """413."""


class UnsupportedMediaType(ServiceError):
    """415."""


class ValidationFailed(ServiceError):
    """422."""


class Overloaded(ServiceError):
    """429: retry later (after the seconds its Retry-After header gives)."""


class NotReady(ServiceError):
    """503."""


class Timeout(ServiceError):
    """504, or 408 (the request did not reach the server in time)."""


# The exception raised for an error answer, by HTTP status (ServiceError for the others:
# 404, 405, 500). What each status means: STATUS_MEANINGS in service/error_codes.py.
EXCEPTION_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    408: Timeout,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    429: Overloaded,
    431: BadRequest,
    503: NotReady,
    504: Timeout,
}


def error_code(text: str) -> ErrorCode | str:
    """The table's ErrorCode for `text`, or `text` itself when the table does not list it."""
    try:
        return ErrorCode(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------- results


@dataclass
class Classification:
    label: int
    class_name: str
    min_distance: float  # ‖e − c‖² to the nearest center, >= 0
    unknown: bool  # unknown_score above the nearest class's threshold
    distances: dict[str, float]  # ‖e − c‖² by class name, nearest first
    unknown_score: float = 0.0  # higher = more unknown; not a distance (may be negative)
    embedding: np.ndarray | None = None  # float32 (D,), when asked for
    atypicality: float | None = None  # part of the unknown score; None for bare vectors

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Classification:
        embedding = row.get("embedding")
        return cls(
            label=row["label"],
            class_name=row["class_name"],
            min_distance=row["min_distance"],
            unknown=row["unknown"],
            distances=row["distances"],
            unknown_score=row.get("unknown_score", row["min_distance"]),
            embedding=None if embedding is None else np.asarray(embedding, np.float32),
            atypicality=row.get("atypicality"),
        )


ImageLike = Any  # str | Path | bytes | PIL.Image.Image | np.ndarray


class Client:
    """A client of one center-embed service (a pooled HTTP connection; close it, or use
    it as a context manager).

        with Client("http://127.0.0.1:8000", api_key="...") as client:
            vectors = client.embed(["cat.jpg", pil_image, pixels])   # float32 (3, D)
            best = client.classify("cat.jpg", top_k=3)[0]
            print(best.class_name, best.min_distance, best.unknown)

    Images: a path (str or Path) or bytes are sent as the file they are. A PIL image in a
    mode PNG holds (1, L, LA, P, RGB, RGBA, I;16) is sent as a PNG of that mode, read by
    the service like a file (alpha dropped); other modes (CMYK, YCbCr, LAB, HSV, I, F) are
    converted to RGB by Pillow first. A numpy array is one image, HWC: (H, W), (H, W, 1),
    (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped by the service, as for an RGBA file);
    (N, H, W, C) is a batch. Channels-first (3, H, W) is refused, not guessed: pass
    `array.transpose(1, 2, 0)`. Values: integers in [0, 255]; floats whose values all lie
    in [0, 1] are scaled by 255, floats in [0, 255] are rounded as they are, anything else
    (negative, over 255, NaN) is refused with a ValueError naming the image.

    A server error is raised as a ServiceError subclass (BadRequest for a bad image, ...)
    whose message names the image as the caller gave it: the path, or `image[i]`.
    """

    def __init__(
        self, url: str, api_key: str | None = None, timeout: float = 60.0, **httpx_options: Any
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, **httpx_options
        )
        self._limits: dict[str, Any] | None = None  # the service's, read at first need

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ the API

    def embed(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """float32 (N, D) embeddings of the images."""
        parts = []
        for batch in self._batches(_encode_all(images)):
            body = self._post("/v1/embed", files=_files(batch))
            parts.append(np.asarray(body["embeddings"], np.float32).reshape(-1, body["dim"]))
        return np.concatenate(parts)

    def classify(
        self,
        images: ImageLike | Sequence[ImageLike],
        top_k: int | None = None,
        return_embeddings: bool = False,
    ) -> list[Classification]:
        params: dict[str, Any] = {"return_embeddings": str(return_embeddings).lower()}
        if top_k is not None:
            params["top_k"] = top_k
        results = []
        for batch in self._batches(_encode_all(images)):
            body = self._post("/v1/classify", files=_files(batch), params=params)
            results += [Classification.from_json(row) for row in body["results"]]
        return results

    def distances(self, embeddings: Any, top_k: int | None = None) -> list[Classification]:
        """Nearest center and distances for embedding vectors, (N, D) or (D,)."""
        vectors = np.asarray(embeddings, dtype=np.float64)
        vectors = vectors[None, :] if vectors.ndim == 1 else vectors
        params = {"top_k": top_k} if top_k is not None else {}
        body = self._post("/v1/distances", json={"embeddings": vectors.tolist()}, params=params)
        return [Classification.from_json(row) for row in body["results"]]

    def model(self) -> dict[str, Any]:
        """Metadata, limits and execution provider."""
        return self._get("/v1/model")

    def centers(self) -> tuple[list[str], np.ndarray]:
        """Class names and float32 (C, D) centers."""
        body = self._get("/v1/centers")
        names = [c["class_name"] for c in body["centers"]]
        return names, np.asarray([c["center"] for c in body["centers"]], np.float32)

    def enroll(
        self,
        name: str,
        images: ImageLike | Sequence[ImageLike],
        mode: str = "replace",
        admin_key: str | None = None,
    ) -> dict[str, Any]:
        """Enrol the class `name` from `images` (as `classify` takes them), without retraining:
        its center and unknown threshold are computed from their embeddings by the service.

        mode "replace" (default): a new class, or an existing one (trained or enrolled)
        recomputed from these images alone; "add": these images added to an enrolled class's
        (its center from all of them). Needs an admin key: `admin_key`, else the client's.
        Returns the service's answer: class_name, action, images, label, unknown_threshold,
        num_classes and the centers' new `version`. Requests that start after it returns
        are answered with the new class, by every worker of the service."""
        path = f"/v1/centers/{quote(name, safe='')}"
        params = {"mode": mode} if mode != "replace" else {}
        parts = _files(_encode_all(images))  # one request: a class comes from one set
        response = self._send("PUT", path, files=parts, params=params, headers=_auth(admin_key))
        return self._answer(response)

    def remove(self, name: str, admin_key: str | None = None) -> dict[str, Any]:
        """Remove the class `name` (trained or enrolled; never the last one). Needs an admin
        key: `admin_key`, else the client's. Returns the answer, with the new `version`."""
        path = f"/v1/centers/{quote(name, safe='')}"
        return self._answer(self._send("DELETE", path, headers=_auth(admin_key)))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------------ transport

    def _batches(self, parts: list[EncodedImage]) -> list[list[EncodedImage]]:
        """`parts` in order, cut into requests the service accepts: at most its max_images
        each, and bodies under its max_body_bytes (one image over it still goes alone, and
        the service's 413 names it)."""
        if len(parts) <= 1:
            return [parts]
        limits = self._service_limits()
        max_images = int(limits.get("max_images") or len(parts))
        max_bytes = int(limits.get("max_body_bytes") or 0) or None
        batches: list[list[EncodedImage]] = [[]]
        size = 0
        for part in parts:
            cost = len(part[1]) + MULTIPART_OVERHEAD + len(part[0].encode())
            full = len(batches[-1]) >= max_images or (max_bytes and size + cost > max_bytes)
            if batches[-1] and full:
                batches.append([])
                size = 0
            batches[-1].append(part)
            size += cost
        return batches

    def _service_limits(self) -> dict[str, Any]:
        """The service's request limits (GET /v1/model), read once per client."""
        if self._limits is None:
            self._limits = dict(self.model().get("limits") or {})
        return self._limits

    def _get(self, path: str) -> Any:
        return self._answer(self._send("GET", path))

    def _post(self, path: str, **kwargs: Any) -> Any:
        return self._answer(self._send("POST", path, **kwargs))

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise ConnectionFailed(0, "client_timeout", f"{method} {path}: {e}") from e
        except httpx.TransportError as e:
            raise ConnectionFailed(0, "connection_failed", f"{method} {path}: {e}") from e

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        if response.status_code == 200:
            return response.json()
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:500] or response.reason_phrase
        cls = EXCEPTION_BY_STATUS.get(response.status_code, ServiceError)
        raise cls(response.status_code, error_code(code), message)


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# --------------------------------------------------------------------------- images


EncodedImage = tuple[str, bytes, str]  # (name, bytes, media type)
# Bytes a multipart part adds to its file (boundary and headers, less the file name).
MULTIPART_OVERHEAD = 160


def _files(parts: list[EncodedImage]) -> list[tuple[str, EncodedImage]]:
    return [("files", part) for part in parts]


def _encode_all(images: Any) -> list[EncodedImage]:
    """(name, bytes, media type) of each image; the name is the path as given, or
    `image[i]` (the image's place in the call) for in-memory inputs. A (N, H, W, C) array
    is N images, alone or as an item of a list. No image at all is a ValueError."""
    single = isinstance(images, str | Path | bytes | bytearray | np.ndarray) or _is_pil(images)
    items: list[Any] = []
    for item in [images] if single else list(images):
        if isinstance(item, np.ndarray) and item.ndim == 4:  # a batch (N, H, W, C)
            items.extend(item)
        else:
            items.append(item)
    if not items:
        raise ValueError("no images given: pass a path, bytes, a PIL image or an array")
    return [_encode(image, f"image[{i}]") for i, image in enumerate(items)]


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


# Modes a PNG holds and the service reads as it reads such a file; others become RGB.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def _encode(image: Any, name: str) -> tuple[str, bytes, str]:
    """(file name, bytes, media type) for one image; `name` for in-memory inputs."""
    if isinstance(image, str | Path):
        return str(image), Path(image).read_bytes(), "application/octet-stream"
    if isinstance(image, bytes | bytearray):
        return name, bytes(image), "application/octet-stream"
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(_pixels(image, name))
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: not an image: {type(image).__name__}")
    if image.mode not in PNG_MODES:  # CMYK, YCbCr, ...: PNG cannot hold them
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return name, buffer.getvalue(), "image/png"


def _pixels(array: np.ndarray, name: str) -> np.ndarray:
    """A uint8 HWC (or HW) array from an array of the shapes and values `Client` accepts."""
    shape = tuple(array.shape)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        raise ValueError(f"{name}: arrays are HWC (H, W, 3); {shape} looks channels-first: "
                         "pass array.transpose(1, 2, 0)")  # fmt: skip
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{name}: arrays are (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got {shape}")  # fmt: skip
    if array.dtype.kind not in "uif":
        raise ValueError(f"{name}: arrays hold integers or floats, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    low, high = float(values.min(initial=0)), float(values.max(initial=0))  # NaN propagates
    if not (np.isfinite(values).all() and low >= 0 and high <= 255):
        raise ValueError(f"{name}: pixel values must lie in [0, 255] (or floats in [0, 1]), "
                         f"got {array.dtype} values from {low} to {high}")  # fmt: skip
    if array.dtype.kind == "f" and high <= 1.0:
        values = values * 255.0  # floats in [0, 1]: the usual float image convention
    return np.rint(values).astype(np.uint8)
