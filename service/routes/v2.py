"""The Open Inference Protocol (KServe / Triton "v2" REST) beside /v1, so Triton's and
KServe's clients, load generators and gateways can call this service as they call Triton:

    GET  /v2                                   server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live  /v2/health/ready     200, or 400 while not ready (as the spec says)
    GET  /v2/models/{name}[/versions/{v}]      model metadata: inputs, outputs, datatypes
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
         JSON tensors or binary ones (Inference-Header-Content-Length); `images` UINT8
         [N, H, W, 3] in, any of the file's outputs (embeddings / distances / labels /
         min_distances / unknown_scores, and atypicality where the file has it) out

The model's name and version: center_embed.contract (PROTOCOL_MODEL_NAME, protocol_version).
Inference goes through the same micro-batcher, limits (max_body_bytes, max_images, the
queue bound and timeout) and API keys as /v1; health, server and model metadata stay open,
like /healthz and /readyz. Every error answers in the protocol's shape, `{"error": "..."}`,
with its status from service/error_codes.py (ProtocolRoute below). These routes are not in
/openapi.json: the protocol's own specification documents them, and its binary bodies have
no JSON schema.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from center_embed import __version__
from center_embed.contract import (
    INPUT_NAME,
    PROTOCOL_MODEL_NAME,
    empty_outputs,
    protocol_version,
    read_model_version,
)
from center_embed.service.batcher import BatchResult, BatchTimeout, Closed, QueueFull
from center_embed.service.deps import (
    BatcherDep,
    CentersDep,
    DecoderDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
    no_unknown_query,
    require_key,
    require_ready,
)
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError, validation_message
from center_embed.service.images import read_body
from center_embed.service.inference_protocol import (
    BINARY_EXTENSION,
    HEADER_LENGTH,
    INPUT_DATATYPE,
    datatype,
    encode_response,
    images_array,
    parse_request,
)
from center_embed.service.pipeline import require_finite
from center_embed.service.routes.inference import scored, timing_headers
from center_embed.service.served_model import ServedModel

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for an ONNX model
SERVER_NAME = "center-embed"
NOT_READY = 400  # the spec: "a 4xx status code indicates false"; Triton answers 400


def protocol_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ProtocolRoute(APIRoute):
    """A route whose every error, its dependencies' included, answers `{"error": "..."}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return protocol_error(e.status, e.message, e.headers)
            except RequestValidationError as e:
                status = ErrorCode.VALIDATION_ERROR.status
                return protocol_error(status, validation_message(list(e.errors())))
            except StarletteHTTPException as e:
                return protocol_error(e.status_code, str(e.detail), e.headers)

        return answer


router = APIRouter(prefix="/v2", tags=["v2"], route_class=ProtocolRoute, include_in_schema=False)

# --------------------------------------------------------------------------- which model


@functools.lru_cache(maxsize=8)
def _version_of(path: str, sha256: str) -> str:  # the file's hash keys a replaced file apart
    return protocol_version(read_model_version(path))


def served_version(model: ServedModel) -> str:
    return _version_of(str(model.model.path), model.sha256)


async def known_model(request: Request, model: ModelDep) -> None:
    """404 unless the path names the served model (and, when given, its version)."""
    name, version = request.path_params["name"], request.path_params.get("version")
    if name != PROTOCOL_MODEL_NAME:
        served_name = PROTOCOL_MODEL_NAME
        raise ApiError(
            ErrorCode.NOT_FOUND, f"unknown model {name!r}; this server serves {served_name!r}"
        )
    served = served_version(model)
    if version is not None and version != served:
        raise ApiError(
            ErrorCode.NOT_FOUND, f"model {name!r} has no version {version!r}; it has {served!r}"
        )


def model_paths(suffix: str = "") -> list[str]:
    return [f"/models/{{name}}{suffix}", f"/models/{{name}}/versions/{{version}}{suffix}"]


def add_model_route(suffix: str, methods: list[str], guards: list[Any]) -> Callable:
    """Register one endpoint under both model paths (with and without a version)."""

    def register(endpoint: Callable) -> Callable:
        for path in model_paths(suffix):
            router.add_api_route(path, endpoint, methods=methods, dependencies=guards)
        return endpoint

    return register


# --------------------------------------------------------------------------- health, metadata


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": [BINARY_EXTENSION]}


@router.get("/health/live")
async def live() -> Response:
    return Response(status_code=200)


async def readiness(request: Request) -> Response:
    """200 when ready, else 400 with no body (a health answer is its status alone)."""
    try:
        await require_ready(request)
    except ApiError:
        return Response(status_code=NOT_READY)
    return Response(status_code=200)


router.add_api_route("/health/ready", readiness, methods=["GET"])
add_model_route("/ready", ["GET"], [Depends(known_model)])(readiness)


@add_model_route("", ["GET"], [Depends(known_model)])
async def model_metadata(model: ModelDep, centers: CentersDep) -> dict[str, Any]:
    """Names, datatypes and shapes (-1: any batch size) from the model's contract; the
    distances' width is the number of classes served now (enrolled ones included)."""
    h, w = model.info.input_size
    outputs = empty_outputs(len(centers.names), model.info.embedding_dim)
    outputs = {name: outputs[name] for name in model.output_names}  # the file's own
    return {
        "name": PROTOCOL_MODEL_NAME,
        "versions": [served_version(model)],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, h, w, 3]}],
        "outputs": [
            {"name": name, "datatype": datatype(value.dtype), "shape": [-1, *value.shape[1:]]}
            for name, value in outputs.items()
        ],
    }


# --------------------------------------------------------------------------- inference

INFER_GUARDS = [Depends(require_key), Depends(known_model), Depends(require_ready),
                Depends(no_unknown_query)]  # fmt: skip


@add_model_route("/infer", ["POST"], INFER_GUARDS)
async def infer(
    request: Request,
    model: ModelDep,
    centers: CentersDep,
    settings: SettingsDep,
    batcher: BatcherDep,
    decoder: DecoderDep,
    metrics: MetricsDep,
) -> Response:
    """Run the request's images through the micro-batcher; answer the outputs it asks for
    (distances, labels, min distances and unknown scores against the request's centers
    snapshot, as /v1)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {encoding} is not supported; send the body uncompressed",
        )
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    loop = asyncio.get_running_loop()  # parsing megabytes of JSON is not for the event loop
    parsed = await loop.run_in_executor(
        decoder, parse_request, body, request.headers.get(HEADER_LENGTH), model.info.input_size,
        settings.max_images, model.output_names,
    )  # fmt: skip
    metrics.images.labels(request.scope["route"].path).inc(parsed.images.count)
    try:
        async with batcher.arrival(parsed.images.count) as arrival:
            if parsed.images.binary is not None:  # a view of the body: no work to offload
                images = images_array(parsed.images)
            else:  # a JSON array of N*H*W*3 numbers: numpy walks it off the event loop
                images = await loop.run_in_executor(decoder, images_array, parsed.images)
            result: BatchResult = await arrival.submit(images, settings.timeout_s)
    except QueueFull as e:
        raise ApiError(ErrorCode.QUEUE_FULL, str(e), {"Retry-After": "1"}) from None
    except BatchTimeout as e:
        raise ApiError(ErrorCode.TIMEOUT, str(e)) from None
    except Closed as e:
        raise ApiError(ErrorCode.SHUTTING_DOWN, str(e)) from None
    metrics.queue_time.observe(result.queue_s)
    require_finite(result.outputs, [f"images[{i}]" for i in range(parsed.images.count)])
    out = scored(result.outputs, centers)
    metrics.observe_scores(out["unknown_scores"], centers.unknown(out), out["atypicality"])
    content, headers = encode_response(
        PROTOCOL_MODEL_NAME, served_version(model), parsed.id, out, parsed.outputs
    )
    return Response(content, headers={**headers, **timing_headers(result)})


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
async def unknown_route(path: str) -> Response:
    """Any other /v2 path: 404 in the protocol's shape (the model repository, statistics,
    shared memory and logging extensions of Triton are not served)."""
    raise ApiError(ErrorCode.NOT_FOUND, f"no route /v2/{path} in this server")
