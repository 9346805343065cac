"""What the routers share: the /v1 router and the OpenAPI declarations of their answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from center_embed.service.deps import V1_GUARDS
from center_embed.service.error_codes import STATUS_MEANINGS
from center_embed.service.schemas import ErrorResponse

TIMING = {
    name: {"description": description, "schema": {"type": "string"}}
    for name, description in (
        ("x-queue-time", "ms waited for the batch to start"),
        ("x-inference-time", "ms of the onnxruntime run (of numpy for /v1/distances)"),
    )
}


def v1_router() -> APIRouter:
    """A router of /v1 routes: an API key (when configured), readiness, no unknown query."""
    return APIRouter(prefix="/v1", tags=["v1"], dependencies=V1_GUARDS)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route documents, with each status's meaning from the table."""
    return {s: {"model": ErrorResponse, "description": STATUS_MEANINGS[s]} for s in statuses}


def ok(model: type, headers: bool = False) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "headers": TIMING} if headers else {"model": model}}
