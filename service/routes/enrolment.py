"""PUT and DELETE /v1/centers/{name}: enrol, replace, add images to, or remove a class,
without retraining (center_embed/enrolment.py says how a center and its threshold are
computed).

    PUT    /v1/centers/{name}            images as /v1/classify takes them: the class's center
                                         and threshold from their embeddings (a new class, or
                                         an existing one replaced)
    PUT    /v1/centers/{name}?mode=add   more images for an enrolled class: its center from
                                         all its images so far
    DELETE /v1/centers/{name}            remove a class (trained or enrolled), never the last

Admin key only (CENTER_EMBED_ADMIN_KEYS; query keys do not open these routes), and off
(403) when none is configured. Images go through the same parsing, limits, decoding and
micro-batcher as /v1/classify. The change is made under the centers file's lock, written
(atomic, fsync'd) and swapped in before the answer: a request that starts after the answer
sees it, in every worker; one already running finishes with the centers it started with.
Every refusal (bad name, no such class, the last class, images refused) changes nothing.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.convertors import Convertor, register_url_convertor

from center_embed.enrolment import CenterSet, CentersSnapshot, EnrolmentError, check_class_name
from center_embed.errors import UserError
from center_embed.service.deps import ADMIN_GUARDS, ImagePipelineDep, MetricsDep, ModelDep
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError
from center_embed.service.prometheus import Metrics
from center_embed.service.routes.common import errors, ok
from center_embed.service.schemas import EnrolmentResponse, images_body
from center_embed.service.served_model import ServedModel

router = APIRouter(prefix="/v1", tags=["enrolment"], dependencies=ADMIN_GUARDS)


class AnyText(Convertor):
    """Any path text, newlines and '/' included (`:path` stops at a newline), so that every
    name, an empty one too (/v1/centers/), reaches the name check and gets its 422 instead
    of a bare 404 from the router."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("class_name", AnyText())
CENTERS_PREFIX = b"/v1/centers/"
ClassName = Annotated[str, Path(description="the class's name: 1-128 characters, no controls")]
Mode = Query("replace", description="replace: the class from these images alone; add: "
             "these images added to an enrolled class's")  # fmt: skip
# What each refusal of center_embed.enrolment answers with.
REFUSALS = {
    "bad_name": ErrorCode.BAD_CLASS_NAME,
    "unknown_class": ErrorCode.CLASS_NOT_FOUND,
    "last_class": ErrorCode.LAST_CLASS,
    "cannot_add": ErrorCode.CANNOT_ADD,
    "no_images": ErrorCode.VALIDATION_ERROR,
    "bad_mode": ErrorCode.VALIDATION_ERROR,
}


@router.put(
    "/centers/{name:class_name}",
    response_model=EnrolmentResponse,
    responses={
        **ok(EnrolmentResponse),
        **errors(400, 401, 403, 408, 409, 413, 415, 422, 429, 503, 504),
    },
    openapi_extra=images_body(),
)
async def enrol(
    name: ClassName,
    request: Request,
    pipeline: ImagePipelineDep,
    model: ModelDep,
    metrics: MetricsDep,
    mode: Literal["replace", "add"] = Mode,
) -> JSONResponse:
    """Enrol the class `name` from the images sent (multipart `files` or JSON base64)."""
    name = class_name(request, name)  # before the body is read
    result = await pipeline.run(request)
    embeddings = result.outputs["embeddings"]  # (n, D)
    atypicality = result.outputs["atypicality"]  # (n,)
    source = f"PUT /v1/centers ({len(embeddings)} images, mode={mode})"

    def change(current: CenterSet) -> CenterSet:
        return current.with_class(name, embeddings, info=model.info, mode=mode, source=source,
                                  atypicality=atypicality)  # fmt: skip

    snapshot = await apply(model, change)
    return answer(snapshot, name, metrics)


@router.delete(
    "/centers/{name:class_name}",
    response_model=EnrolmentResponse,
    responses={**ok(EnrolmentResponse), **errors(401, 403, 404, 409, 422, 503)},
)
async def remove(
    name: ClassName, request: Request, model: ModelDep, metrics: MetricsDep
) -> JSONResponse:
    """Remove the class `name`: it is no longer answered, from the next request on."""
    name = class_name(request, name)
    snapshot = await apply(model, lambda current: current.without_class(name, "DELETE"))
    return answer(snapshot, name, metrics)


def class_name(request: Request, name: str) -> str:
    """The class name of the request's path, normalised (NFC, surrounding spaces trimmed) as
    every name is before it is compared or stored: 422 when it may not name a class, 400
    when the path's bytes are not UTF-8 (`%FF`, an encoded lone surrogate), which the router
    would have turned into U+FFFD, another name than the client's."""
    raw = request.scope.get("raw_path")
    if raw is not None:
        segment = raw.split(b"?", 1)[0].split(CENTERS_PREFIX, 1)[-1]
        try:
            urllib.parse.unquote_to_bytes(segment).decode("utf-8")  # strict: no surrogates
        except UnicodeDecodeError as e:
            raise ApiError(
                ErrorCode.BAD_REQUEST, f"the class name in the path is not valid UTF-8 (byte "
                f"{e.object[e.start]:#04x} at {e.start}): percent-encode its UTF-8 bytes",
            ) from None  # fmt: skip
    try:
        return check_class_name(name)
    except EnrolmentError as e:
        raise refusal(e) from None


def refusal(e: EnrolmentError) -> ApiError:
    code = REFUSALS[e.kind]
    return ApiError(code, str(e))


async def apply(model: ServedModel, change: Callable[[CenterSet], CenterSet]) -> CentersSnapshot:
    """`change` under the file's lock, in a thread (a lock wait and an fsync); refusals as
    their 4xx, a centers file that cannot be read or written as a 503."""
    try:
        return await asyncio.to_thread(model.change_centers, change)
    except EnrolmentError as e:
        raise refusal(e) from None
    except UserError as e:
        raise ApiError(ErrorCode.CENTERS_UNAVAILABLE, str(e)) from None
    except OSError as e:  # its words, never its path (the server's folders are not for clients)
        file = model.store.path.name if model.store is not None else "centers file"
        reason = e.strerror or type(e).__name__
        message = f"the centers file {file} cannot be written: {reason}"
        raise ApiError(ErrorCode.CENTERS_UNAVAILABLE, message) from None


def answer(snapshot: CentersSnapshot, name: str, metrics: Metrics) -> JSONResponse:
    entry = snapshot.centers.log[-1]
    metrics.enrolments.labels(entry["action"]).inc()
    metrics.centers_version.set(snapshot.version)
    label = snapshot.names.index(name) if name in snapshot.names else None
    body = {
        "class_name": name,
        "action": entry["action"],
        "images": entry["images"],
        "label": label,
        "unknown_threshold": snapshot.centers.thresholds.get(name),
        "num_classes": len(snapshot.names),
        "version": snapshot.version,
    }
    return JSONResponse(body)
