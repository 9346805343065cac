"""The app factory: `create_app(settings)` builds a FastAPI app serving one ONNX model.

    uvicorn --factory center_embed.service.app:app_from_env   # settings from CENTER_EMBED_*

The model is opened in the lifespan (through center_embed/runtime.py: onnxruntime, numpy and
Pillow, never torch), kept on app.state with the rest of what the routes use (they take it as
dependencies: service/deps.py), and warmed up in the background; /readyz answers 503 until that
warm-up has passed, and so does every /v1 route. At shutdown the batcher answers every
request already queued before the worker thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from PIL import Image

from center_embed import __version__
from center_embed.enrolment import centers_file_for
from center_embed.errors import UserError
from center_embed.service.batcher import MicroBatcher
from center_embed.service.decode_pool import (
    LARGE_IMAGE_NICENESS,
    SMALL_IMAGE_PIXELS,
    DecodeExecutor,
    DecodePool,
)
from center_embed.service.errors import install_handlers
from center_embed.service.middleware import ObservabilityMiddleware
from center_embed.service.pipeline import ImagePipeline
from center_embed.service.prometheus import Metrics
from center_embed.service.routes import enrolment, health, inference, model_info, v2
from center_embed.service.security import KeyChecker
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings

log = logging.getLogger("center_embed.service")

DESCRIPTION = """\
Image embeddings, nearest-center classification and distances to every class center,
from a center-embed ONNX model.

Images: multipart `files` parts, or JSON `{"images": ["<base64>", ...]}` (data URIs
accepted). JPEG, PNG, WebP, GIF, BMP or TIFF by default (CENTER_EMBED_IMAGE_FORMATS; others:
415); EXIF orientation applied, converted to RGB (deeper pixels scaled), shorter side
resized to the model's input size (bilinear), centre-cropped. Distances are of the kind
the model's `distance` metadata names.

Errors are JSON `{"error": {"code": ..., "message": ...}}`. Timing headers on image
routes: `x-queue-time` and `x-inference-time`, in milliseconds.
"""


# The service's telemetry is /metrics (Prometheus) and JSON log lines. FastAPI's own
# OpenTelemetry hook (in recent versions) asks three global providers on every request
# (2.3% of the event loop's samples under load, py-spy); older versions have no hook, and
# no `telemetry` argument.
NO_FASTAPI_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(settings: Settings | None = None, model: ServedModel | None = None) -> FastAPI:
    """An app for `settings` (default: from the environment). `model`: an already opened
    model to serve instead of opening `settings.model` (tests wrap one this way)."""
    settings = settings if settings is not None else Settings()
    if model is None and settings.model is None:
        raise UserError("no model to serve: set CENTER_EMBED_MODEL or give a model path")
    metrics = Metrics()
    keys = KeyChecker(settings.keys())  # a bad key file fails here, before anything serves
    admin_keys = KeyChecker([k.get_secret_value().encode() for k in settings.admin_keys])
    lifespan = functools.partial(
        _lifespan, settings=settings, metrics=metrics, keys=(keys, admin_keys), given_model=model
    )
    app = FastAPI(
        title="center-embed",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
        **NO_FASTAPI_TELEMETRY,
    )
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(model_info.router)
    app.include_router(inference.router)
    app.include_router(enrolment.router)
    app.include_router(v2.router)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["x-queue-time", "x-inference-time"],
        )
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory: settings from CENTER_EMBED_* (each worker builds its own)."""
    return create_app(Settings())


@contextlib.asynccontextmanager
async def _lifespan(
    app: FastAPI,
    *,
    settings: Settings,
    metrics: Metrics,
    keys: tuple[KeyChecker, KeyChecker],  # (query keys, admin keys)
    given_model: ServedModel | None,
) -> AsyncIterator[None]:
    """Open the model, start the decode pool and the batcher, and keep them on app.state
    (the one place it is set; service/deps.py reads it); at shutdown, answer what is queued."""
    pools = _decode_pools(settings, metrics)  # their processes start meanwhile
    try:
        model = given_model
        if model is None:
            model = await asyncio.to_thread(
                ServedModel.open, settings.model, settings.runtime_options()
            )
            log.info("model opened", extra={"fields": {"runtime": model.runtime}})
        centers_file = settings.centers_file or centers_file_for(model.model.path)
        await asyncio.to_thread(model.use_centers_file, centers_file)  # another model's: refused
        await _decoding_ready(pools)
    except BaseException:
        for pool in pools:
            pool.close()
        raise
    metrics.centers_version.set(model.current_centers().version)
    metrics.set_model(model.info.unknown_threshold)
    small_pool, large_pool = pools
    timeouts = (settings.timeout_s, settings.decode_timeout_s)
    large = DecodeExecutor(large_pool, large_pool.size, *timeouts)  # a thread per worker
    decoder = DecodeExecutor(small_pool, small_pool.size, *timeouts, large=large)
    batcher = MicroBatcher(
        lambda images: model.run(images),  # late-bound: a test may wrap model.run
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        metrics=metrics,
    )
    state = app.state
    state.settings, state.metrics, (state.keys, state.admin_keys) = settings, metrics, keys
    state.model, state.decoder, state.batcher = model, decoder, batcher
    state.decode_pool, state.large_decode_pool = small_pool, large_pool
    state.pipeline = ImagePipeline(settings, model, batcher, decoder, metrics)
    state.ready, state.warmup_error = False, None  # until _warm_up has passed
    batcher.start()
    warm_up = asyncio.create_task(_warm_up(app, model))
    try:
        yield
    finally:
        state.ready = False
        metrics.ready.set(0)
        warm_up.cancel()
        # Past the grace time now: decodes still running are killed (their threads return
        # at once), so the shutdown never waits for one.
        decoder.close_pools()
        await batcher.close()  # answers whatever is still queued
        decoder.shutdown(wait=True, cancel_futures=True)  # queued decodes of cut requests
        log.info("stopped", extra={"fields": {"model": str(settings.model)}})


def _decode_pools(settings: Settings, metrics: Metrics) -> tuple[DecodePool, DecodePool]:
    """Small images' pool and large ones' (service/decode_pool.py): at most half the cores
    decode large images at once, at a lower priority."""
    workers = settings.decode_threads or os.cpu_count() or 1
    small = DecodePool(
        workers, min(settings.max_pixels, SMALL_IMAGE_PIXELS), observer=metrics.decode_pool("small")
    )
    large = DecodePool(
        max(1, workers // 2), settings.max_pixels, niceness=LARGE_IMAGE_NICENESS,
        observer=metrics.decode_pool("large"),
    )  # fmt: skip
    return small, large


async def _decoding_ready(pools: tuple[DecodePool, ...]) -> None:
    for pool in pools:
        await asyncio.to_thread(pool.wait_ready)
    # Every Pillow plugin imported now (~50 ms), not on the event loop by the first image
    # whose format the pool picker sniffs (decode_pool.DecodeExecutor.for_image).
    await asyncio.to_thread(Image.init)


async def _warm_up(app: FastAPI, model: ServedModel) -> None:
    state = app.state
    batch_sizes = tuple(sorted({1, min(8, state.settings.max_batch)}))
    try:
        await asyncio.to_thread(model.warm_up, batch_sizes)
    except Exception as e:
        state.warmup_error = str(e)
        log.exception("warm-up failed; the service stays not ready")
        return
    state.ready = True
    state.metrics.ready.set(1)
    log.info(
        "ready", extra={"fields": {"model": str(state.settings.model), "provider": model.provider}}
    )
