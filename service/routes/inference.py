"""/v1/embed and /v1/classify (images through the micro-batcher and the runtime: the
ImagePipeline of service/pipeline.py), and /v1/distances (embedding vectors, numpy in the
decode pool, no queue).

Distances, labels and unknown flags come from the request's centers snapshot (CentersDep,
taken when the request starts), computed in numpy from the graph's embeddings, so enrolled
classes are answered like trained ones and an enrolment never tears an answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import Query, Request
from fastapi.responses import JSONResponse

from center_embed.enrolment import CentersSnapshot
from center_embed.service.batcher import BatchResult
from center_embed.service.deps import (
    CentersDep,
    DecoderDep,
    ImagePipelineDep,
    ModelDep,
    SettingsDep,
)
from center_embed.service.images import (
    JSON,
    read_body,
    require_media_type,
    vectors_body_limit,
    vectors_from_json,
)
from center_embed.service.pipeline import require_finite
from center_embed.service.routes.common import errors, ok, v1_router
from center_embed.service.schemas import (
    ClassifyResponse,
    EmbedResponse,
    images_body,
    vectors_body,
)

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
    centers: CentersDep,
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
    pipeline.metrics.observe_scores(out["unknown_scores"], centers.unknown(out), out["atypicality"])
    body = {"results": results, "model": pipeline.model.summary(centers)}
    return JSONResponse(body, headers=timing_headers(result))


def scored(outputs: dict[str, np.ndarray], centers: CentersSnapshot) -> dict[str, np.ndarray]:
    """The graph's outputs (checked finite already: ImagePipeline.run) with distances,
    labels, min distances and unknown scores against `centers` (the atypicality from the
    graph)."""
    scores = centers.scores(outputs["embeddings"], outputs["atypicality"])
    require_finite(scores, [f"images[{i}]" for i in range(len(outputs["embeddings"]))])
    return {**outputs, **scores}


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
