"""The HTTP routes: health and metrics (always open), and the /v1 API (keys when configured).

GET  /healthz  /readyz  /metrics
GET  /v1/model  /v1/centers
POST /v1/embed  /v1/classify  (images)      POST /v1/distances  (embedding vectors)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from center_embed.service.batcher import BatchResult, BatchTimeout, Closed, QueueFull
from center_embed.service.error_codes import STATUS_MEANINGS, ErrorCode
from center_embed.service.errors import ApiError
from center_embed.service.images import (
    JSON,
    decode_parts,
    image_parts,
    read_body,
    require_media_type,
    vectors_from_json,
)
from center_embed.service.model import ServedModel
from center_embed.service.schemas import (
    CentersResponse,
    ClassifyResponse,
    EmbedResponse,
    ErrorResponse,
    ModelResponse,
    Status,
    images_body,
    vectors_body,
)
from center_embed.service.security import require_key

TIMING = {
    name: {"description": description, "schema": {"type": "string"}}
    for name, description in (
        ("x-queue-time", "ms waited for the batch to start"),
        ("x-inference-time", "ms of the onnxruntime run (of numpy for /v1/distances)"),
    )
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": STATUS_MEANINGS[code]} for code in codes}


def ok(model: type, headers: bool = False) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "headers": TIMING} if headers else {"model": model}}


async def require_ready(request: Request) -> None:
    if not request.app.state.ready:
        raise ApiError(ErrorCode.NOT_READY, not_ready_message(request))


def not_ready_message(request: Request) -> str:
    failure = request.app.state.warmup_error
    return f"model failed to warm up: {failure}" if failure else "model is loading or warming up"


def served(request: Request) -> ServedModel:
    return request.app.state.model


# --------------------------------------------------------------------------- open routes

open_router = APIRouter(tags=["operations"])


@open_router.get("/healthz", response_model=Status, summary="the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@open_router.get(
    "/readyz",
    response_model=Status,
    responses=errors(503),
    summary="the model is loaded and warmed up",
)
async def readyz(request: Request) -> dict[str, str]:
    await require_ready(request)
    return {"status": "ready"}


@open_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


# --------------------------------------------------------------------------- /v1


async def no_unknown_query(request: Request) -> None:
    """Refuse query parameters the route does not declare: `?topk=3` must not pass silently."""
    route = request.scope.get("route")
    declared = {p.alias for p in getattr(getattr(route, "dependant", None), "query_params", [])}
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        allowed = ", ".join(sorted(declared)) or "none"
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, f"unknown query parameter(s) {unknown}; allowed: {allowed}"
        )


api = APIRouter(
    prefix="/v1",
    tags=["v1"],
    dependencies=[Depends(require_key), Depends(require_ready), Depends(no_unknown_query)],
)
TOP_K = Query(None, ge=1, description="keep only the k nearest centers")
WITH_EMBEDDINGS = Query(False, description="add each image's embedding")


@api.get("/model", response_model=ModelResponse, responses=errors(401, 503))
async def model_info(request: Request) -> JSONResponse:
    """The model's metadata, the limits in force and the execution provider in use."""
    model = served(request)
    return JSONResponse(
        {
            "metadata": model.metadata(),
            "limits": request.app.state.settings.limits(),
            "provider": model.provider,
            "model": model.summary(),
        }
    )


@api.get("/centers", response_model=CentersResponse, responses=errors(401, 503))
async def centers(request: Request) -> JSONResponse:
    """Every class center, in label order."""
    model = served(request)
    rows = [
        {"label": i, "class_name": name, "center": center}
        for i, (name, center) in enumerate(
            zip(model.info.class_names, model.centers.tolist(), strict=True)
        )
    ]
    return JSONResponse({"centers": rows, "dim": model.info.embedding_dim})


IMAGE_ERRORS = errors(400, 401, 413, 415, 422, 429, 503, 504)


@api.post(
    "/embed",
    response_model=EmbedResponse,
    responses={**ok(EmbedResponse, headers=True), **IMAGE_ERRORS},
    openapi_extra=images_body(),
)
async def embed(request: Request) -> JSONResponse:
    """Embeddings of images sent as multipart `files` parts or as JSON base64 strings."""
    result = await run_images(request)
    embeddings = result.outputs["embeddings"]  # (N, D)
    body = {"embeddings": embeddings.tolist(), "dim": embeddings.shape[1]}
    return JSONResponse(body, headers=timing_headers(result))


@api.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={**ok(ClassifyResponse, headers=True), **IMAGE_ERRORS},
    response_model_exclude_none=True,
    openapi_extra=images_body(),
)
async def classify(
    request: Request, top_k: int | None = TOP_K, return_embeddings: bool = WITH_EMBEDDINGS
) -> JSONResponse:
    """Per image: nearest center (label, class name), min distance, unknown flag and the
    distances to every center by class name."""
    result = await run_images(request)
    model = served(request)
    out = result.outputs
    results = classifications(model, out, top_k, out["embeddings"] if return_embeddings else None)
    unknown = model.unknown(out["min_distances"])
    request.app.state.metrics.observe_distances(out["min_distances"], unknown)  # drift signal
    return JSONResponse(
        {"results": results, "model": model.summary()}, headers=timing_headers(result)
    )


@api.post(
    "/distances",
    response_model=ClassifyResponse,
    responses={**ok(ClassifyResponse, headers=True), **errors(400, 401, 413, 415, 422, 503)},
    response_model_exclude_none=True,
    openapi_extra=vectors_body(),
)
async def distances(request: Request, top_k: int | None = TOP_K) -> JSONResponse:
    """Nearest center and distances for embedding vectors (no images): as /v1/classify."""
    model = served(request)
    settings = request.app.state.settings
    require_media_type(request, (JSON,))
    body = await read_body(request, settings.max_body_bytes)
    vectors = vectors_from_json(body, model.info.embedding_dim, settings.max_vectors)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    out = await loop.run_in_executor(request.app.state.decoder, model.distances, vectors)
    timing = BatchResult(out, 0.0, time.perf_counter() - started, len(vectors))  # no queue
    results = classifications(model, out, top_k, None)
    body = {"results": results, "model": model.summary()}
    return JSONResponse(body, headers=timing_headers(timing))


# --------------------------------------------------------------------------- helpers


async def run_images(request: Request) -> BatchResult:
    """Read, decode (in the thread pool) and batch the request's images."""
    state = request.app.state
    settings, model = state.settings, state.model
    parts = await image_parts(request, settings.max_body_bytes, settings.max_images)
    state.metrics.images.labels(request.scope["route"].path).inc(len(parts))
    loop = asyncio.get_running_loop()
    try:
        async with state.batcher.arrival(len(parts)) as arrival:
            images = await loop.run_in_executor(
                state.decoder, decode_parts, model, parts, settings.max_pixels
            )
            result = await arrival.submit(images, settings.timeout_s)
    except QueueFull as e:
        raise ApiError(ErrorCode.QUEUE_FULL, str(e), {"Retry-After": "1"}) from None
    except BatchTimeout as e:
        raise ApiError(ErrorCode.TIMEOUT, str(e)) from None
    except Closed as e:
        raise ApiError(ErrorCode.SHUTTING_DOWN, str(e)) from None
    state.metrics.queue_time.observe(result.queue_s)
    return result


def classifications(
    model: ServedModel,
    out: dict[str, np.ndarray],
    top_k: int | None,
    embeddings: np.ndarray | None,
) -> list[dict[str, Any]]:
    names = model.info.class_names
    d = out["distances"]  # (N, C)
    k = d.shape[1] if top_k is None else min(top_k, d.shape[1])
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]  # (N, k), nearest first
    unknown = model.unknown(out["min_distances"])
    rows = d.tolist()
    results = []
    for i, (label, min_distance) in enumerate(
        zip(out["labels"].tolist(), out["min_distances"].tolist(), strict=True)
    ):
        result = {
            "label": label,
            "class_name": names[label],
            "min_distance": min_distance,
            "unknown": bool(unknown[i]),
            "distances": {names[j]: rows[i][j] for j in nearest[i].tolist()},
        }
        if embeddings is not None:
            result["embedding"] = embeddings[i].tolist()
        results.append(result)
    return results


def timing_headers(result: BatchResult) -> dict[str, str]:
    return {
        "x-queue-time": f"{result.queue_s * 1000:.3f}",
        "x-inference-time": f"{result.inference_s * 1000:.3f}",
    }
