"""/v1/embed and /v1/classify (images through the micro-batcher and onnxruntime), and
/v1/distances (embedding vectors, numpy in the decode pool, no queue)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse

from center_embed.service.batcher import BatchResult, BatchTimeout, Closed, MicroBatcher, QueueFull
from center_embed.service.deps import (
    BatcherDep,
    DecoderDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
)
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError
from center_embed.service.images import (
    JSON,
    decode_parts,
    image_parts,
    read_body,
    require_media_type,
    vectors_from_json,
)
from center_embed.service.prometheus import Metrics
from center_embed.service.routes.common import errors, ok, v1_router
from center_embed.service.schemas import (
    ClassifyResponse,
    EmbedResponse,
    images_body,
    vectors_body,
)
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings

# --------------------------------------------------------------------------- images in


@dataclass(frozen=True)
class ImagePipeline:
    """Read a request's images, decode them in the decode pool, run them in a batch."""

    settings: Settings
    model: ServedModel
    batcher: MicroBatcher
    decoder: Executor
    metrics: Metrics

    async def run(self, request: Request) -> BatchResult:
        """The request's outputs, or the ApiError that says why not (4xx, 503, 504)."""
        settings = self.settings
        parts = await image_parts(request, settings.max_body_bytes, settings.max_images)
        self.metrics.images.labels(request.scope["route"].path).inc(len(parts))
        loop = asyncio.get_running_loop()
        try:
            async with self.batcher.arrival(len(parts)) as arrival:
                images = await loop.run_in_executor(
                    self.decoder, decode_parts, self.model, parts, settings.max_pixels
                )
                result = await arrival.submit(images, settings.timeout_s)
        except QueueFull as e:
            raise ApiError(ErrorCode.QUEUE_FULL, str(e), {"Retry-After": "1"}) from None
        except BatchTimeout as e:
            raise ApiError(ErrorCode.TIMEOUT, str(e)) from None
        except Closed as e:
            raise ApiError(ErrorCode.SHUTTING_DOWN, str(e)) from None
        self.metrics.queue_time.observe(result.queue_s)
        return result


async def get_image_pipeline(
    settings: SettingsDep,
    model: ModelDep,
    batcher: BatcherDep,
    decoder: DecoderDep,
    metrics: MetricsDep,
) -> ImagePipeline:
    return ImagePipeline(settings, model, batcher, decoder, metrics)


ImagePipelineDep = Annotated[ImagePipeline, Depends(get_image_pipeline)]

# --------------------------------------------------------------------------- routes

router = v1_router()
TOP_K = Query(None, ge=1, description="keep only the k nearest centers")
WITH_EMBEDDINGS = Query(False, description="add each image's embedding")
IMAGE_ERRORS = errors(400, 401, 413, 415, 422, 429, 503, 504)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses={**ok(EmbedResponse, headers=True), **IMAGE_ERRORS},
    openapi_extra=images_body(),
)
async def embed(request: Request, pipeline: ImagePipelineDep) -> JSONResponse:
    """Embeddings of images sent as multipart `files` parts or as JSON base64 strings."""
    result = await pipeline.run(request)
    embeddings = result.outputs["embeddings"]  # (N, D)
    body = {"embeddings": embeddings.tolist(), "dim": embeddings.shape[1]}
    return JSONResponse(body, headers=timing_headers(result))


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={**ok(ClassifyResponse, headers=True), **IMAGE_ERRORS},
    response_model_exclude_none=True,
    openapi_extra=images_body(),
)
async def classify(
    request: Request,
    pipeline: ImagePipelineDep,
    model: ModelDep,
    metrics: MetricsDep,
    top_k: int | None = TOP_K,
    return_embeddings: bool = WITH_EMBEDDINGS,
) -> JSONResponse:
    """Per image: nearest center (label, class name), min distance, unknown flag and the
    distances to every center by class name."""
    result = await pipeline.run(request)
    out = result.outputs
    results = classifications(model, out, top_k, out["embeddings"] if return_embeddings else None)
    metrics.observe_distances(out["min_distances"], model.unknown(out["min_distances"]))  # drift
    return JSONResponse(
        {"results": results, "model": model.summary()}, headers=timing_headers(result)
    )


@router.post(
    "/distances",
    response_model=ClassifyResponse,
    responses={**ok(ClassifyResponse, headers=True), **errors(400, 401, 413, 415, 422, 503)},
    response_model_exclude_none=True,
    openapi_extra=vectors_body(),
)
async def distances(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    top_k: int | None = TOP_K,
) -> JSONResponse:
    """Nearest center and distances for embedding vectors (no images): as /v1/classify."""
    require_media_type(request, (JSON,))
    body = await read_body(request, settings.max_body_bytes)
    vectors = vectors_from_json(body, model.info.embedding_dim, settings.max_vectors)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    out = await loop.run_in_executor(decoder, model.distances, vectors)
    timing = BatchResult(out, 0.0, time.perf_counter() - started, len(vectors))  # no queue
    results = classifications(model, out, top_k, None)
    body = {"results": results, "model": model.summary()}
    return JSONResponse(body, headers=timing_headers(timing))


# --------------------------------------------------------------------------- answers out


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
