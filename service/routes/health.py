"""Health, readiness and Prometheus metrics: always open (no API key), for orchestrators
and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from center_embed.service.deps import MetricsDep, require_ready
from center_embed.service.routes.common import errors
from center_embed.service.schemas import Status

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status, summary="the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Status,
    responses=errors(503),
    summary="the model is loaded and warmed up",
    dependencies=[Depends(require_ready)],
)
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(collected: MetricsDep) -> Response:
    body, content_type = collected.exposition()
    return Response(body, media_type=content_type)
