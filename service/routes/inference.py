"""/v1/embed and /v1/classify (images through the micro-batcher and onnxruntime), and
/v1/distances (embedding vectors, numpy in the decode pool, no queue).

Distances, labels and unknown flags come from the request's centers snapshot (CentersDep,
taken when the request starts), computed in numpy from the graph's embeddings, so enrolled
classes are answered like trained ones and an enrolment never tears an answer.

An image request's `timeout_s` starts once its body is in and covers decoding, the queue
and inference (504 past it); every output is checked finite before it is serialised (a
non-finite value is a 422 naming the input, never a 500 from the JSON encoder).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse

from center_embed.enrolment import CentersSnapshot
from center_embed.service.batcher import BatchResult, BatchTimeout, Closed, MicroBatcher, QueueFull
from center_embed.service.decode_pool import DecodeExecutor
from center_embed.service.deps import (
    BatcherDep,
    CentersDep,
    DecoderDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
)
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError
from center_embed.service.images import (
    JSON,
    ImageLimits,
    ImagePart,
    decode_part,
    image_parts,
    probe_parts,
    read_body,
    require_media_type,
    require_nonempty,
    vectors_body_limit,
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
    decoder: DecodeExecutor
    metrics: Metrics

    @property
    def limits(self) -> ImageLimits:
        s = self.settings
        return ImageLimits(tuple(s.image_formats), s.max_pixels, s.max_request_pixels)

    async def run(self, request: Request) -> BatchResult:
        """The request's outputs, or the ApiError that says why not (4xx, 503, 504)."""
        s = self.settings
        parts = await image_parts(
            request, s.max_body_bytes, s.body_timeout_s, s.max_images, self.decoder
        )
        self.metrics.images.labels(request.scope["route"].path).inc(len(parts))
        deadline = time.perf_counter() + s.timeout_s
        limits = self.limits
        try:
            require_nonempty(parts)
            if len(parts) > 1 or limits.max_request_pixels < limits.max_pixels:
                # Every header before any pixel: a request's images are refused as a whole.
                # One image's decode checks its own header first, in the same worker call.
                await self._in_pool(
                    deadline, "reading the image headers", probe_parts, parts, limits
                )
            async with self.batcher.arrival(len(parts)) as arrival:
                images = await self.decode(parts, deadline)
                remaining = max(deadline - time.perf_counter(), 1e-3)
                result = await arrival.submit(images, remaining)
        except QueueFull as e:
            raise ApiError(ErrorCode.QUEUE_FULL, str(e), {"Retry-After": "1"}) from None
        except BatchTimeout:
            message = f"no answer within {s.timeout_s:g} s (queue and inference)"
            raise ApiError(ErrorCode.TIMEOUT, message) from None
        except Closed as e:
            raise ApiError(ErrorCode.SHUTTING_DOWN, str(e)) from None
        require_finite(result.outputs, [part.name for part in parts])
        self.metrics.queue_time.observe(result.queue_s)
        return result

    async def decode(self, parts: list[ImagePart], deadline: float) -> np.ndarray:
        """Decode image by image, each a task of its own in the pool: a request holds at
        most one decoding thread (requests take turns), and stops at its deadline."""
        size = self.model.info.input_size[0]
        batch = np.empty((len(parts), size, size, 3), np.uint8)
        limits = self.limits
        for i, part in enumerate(parts):
            what = f"decoding ({i} of {len(parts)} images done)"
            executor = self.decoder.for_image(part.data, limits.formats)  # small, large apart
            batch[i] = await self._in_pool(
                deadline, what, decode_part, part, size, limits, executor=executor
            )
        return batch

    async def _in_pool(
        self, deadline: float, what: str, work: Any, *args: Any, executor: Executor | None = None
    ) -> Any:
        """`work(*args)` in the decode threads (`executor`, default: the service's), or a 504
        at the deadline (the work leaves the executor's queue if it has not started; a started
        image is stopped at its own deadline, its worker killed)."""
        remaining = deadline - time.perf_counter()
        timeout = ApiError(
            ErrorCode.TIMEOUT, f"no answer within {self.settings.timeout_s:g} s: {what}"
        )
        if remaining <= 0:
            raise timeout
        job = asyncio.get_running_loop().run_in_executor(executor or self.decoder, work, *args)
        try:
            return await asyncio.wait_for(job, remaining)
        except TimeoutError:
            raise timeout from None


def require_finite(outputs: dict[str, np.ndarray], names: list[str]) -> None:
    """422 naming the first input whose outputs hold NaN or infinity: the JSON encoder would
    refuse them (a 500), and no client can use them."""
    bad = np.zeros(len(names), bool)
    for value in outputs.values():
        if value.dtype.kind == "f":
            bad |= ~np.isfinite(value.reshape(len(names), -1)).all(1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ApiError(
            ErrorCode.NON_FINITE_OUTPUT,
            f"the model's outputs for {names[first]} are not finite (NaN or infinite); "
            f"{int(bad.sum())} of {len(names)} inputs affected",
        )


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
IMAGE_ERRORS = errors(400, 401, 408, 413, 415, 422, 429, 503, 504)


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
    centers: CentersDep,
    metrics: MetricsDep,
    top_k: int | None = TOP_K,
    return_embeddings: bool = WITH_EMBEDDINGS,
) -> JSONResponse:
    """Per image: nearest center (label, class name), its squared distance, the unknown score
    and flag, the squared distances to every center by class name (enrolled classes
    included) and the image's atypicality (part of its unknown score)."""
    result = await pipeline.run(request)
    out = scored(result.outputs, centers)
    embeddings = out["embeddings"] if return_embeddings else None
    results = classifications(centers, out, top_k, embeddings)
    metrics.observe_scores(out["unknown_scores"], centers.unknown(out), out["atypicality"])
    return JSONResponse(
        {"results": results, "model": model.summary(centers)}, headers=timing_headers(result)
    )


def scored(outputs: dict[str, np.ndarray], centers: CentersSnapshot) -> dict[str, np.ndarray]:
    """The graph's outputs with distances, labels, min distances and unknown scores against
    `centers` (the atypicality from the graph)."""
    out = {**outputs, **centers.scores(outputs["embeddings"], outputs["atypicality"])}
    require_finite(out, [f"images[{i}]" for i in range(len(outputs["embeddings"]))])
    return out


@router.post(
    "/distances",
    response_model=ClassifyResponse,
    responses={**ok(ClassifyResponse, headers=True), **errors(400, 401, 408, 413, 415, 422, 503)},
    response_model_exclude_none=True,
    openapi_extra=vectors_body(),
)
async def distances(
    request: Request,
    model: ModelDep,
    centers: CentersDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    top_k: int | None = TOP_K,
) -> JSONResponse:
    """Nearest center, distances and unknown score for embedding vectors (no images): as
    /v1/classify, without an atypicality (a vector carries none)."""
    require_media_type(request, (JSON,))
    dim = model.info.embedding_dim
    limit = vectors_body_limit(settings.max_body_bytes, settings.max_vectors, dim)
    body = await read_body(request, limit, settings.body_timeout_s)
    loop = asyncio.get_running_loop()  # parsing a few MB of JSON is not for the event loop
    vectors = await loop.run_in_executor(
        decoder, vectors_from_json, body, dim, settings.max_vectors, centers.max_embedding_norm
    )
    started = time.perf_counter()
    out = await loop.run_in_executor(decoder, centers.scores, vectors)
    require_finite(out, [f"embeddings[{i}]" for i in range(len(vectors))])
    timing = BatchResult(out, 0.0, time.perf_counter() - started, len(vectors))  # no queue
    results = classifications(centers, out, top_k, None)
    body = {"results": results, "model": model.summary(centers)}
    return JSONResponse(body, headers=timing_headers(timing))


# --------------------------------------------------------------------------- answers out


def classifications(
    centers: CentersSnapshot,
    out: dict[str, np.ndarray],
    top_k: int | None,
    embeddings: np.ndarray | None,
) -> list[dict[str, Any]]:
    names = centers.names
    d = out["distances"]  # (N, C)
    k = d.shape[1] if top_k is None else min(top_k, d.shape[1])
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]  # (N, k), nearest first
    unknown = centers.unknown(out)
    rows = d.tolist()
    atypicality = out["atypicality"].tolist() if "atypicality" in out else None
    scores = out["unknown_scores"].tolist()
    results = []
    for i, (label, min_distance) in enumerate(
        zip(out["labels"].tolist(), out["min_distances"].tolist(), strict=True)
    ):
        result = {
            "label": label,
            "class_name": names[label],
            "min_distance": min_distance,
            "unknown_score": scores[i],
            "unknown": bool(unknown[i]),
            "distances": {names[j]: rows[i][j] for j in nearest[i].tolist()},
        }
        if atypicality is not None:
            result["atypicality"] = atypicality[i]
        if embeddings is not None:
            result["embedding"] = embeddings[i].tolist()
        results.append(result)
    return results


def timing_headers(result: BatchResult) -> dict[str, str]:
    return {
        "x-queue-time": f"{result.queue_s * 1000:.3f}",
        "x-inference-time": f"{result.inference_s * 1000:.3f}",
    }
