"""The app factory: `create_app(settings)` builds a FastAPI app serving one ONNX model.

    uvicorn --factory center_embed.service.app:app_from_env   # settings from CENTER_EMBED_*

The model is opened in the lifespan (through center_embed/runtime.py: onnxruntime, numpy and
Pillow, never torch) and warmed up in the background; /readyz answers 503 until that
warm-up has passed, and so does every /v1 route. At shutdown the batcher answers every
request already queued before the worker thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from center_embed import __version__
from center_embed.errors import UserError
from center_embed.service.batcher import MicroBatcher
from center_embed.service.errors import install_handlers
from center_embed.service.middleware import ObservabilityMiddleware
from center_embed.service.model import ServedModel
from center_embed.service.prometheus import Metrics
from center_embed.service.routes import api, open_router
from center_embed.service.security import KeyChecker
from center_embed.service.settings import Settings

log = logging.getLogger("center_embed.service")

DESCRIPTION = """\
Image embeddings, nearest-center classification and distances to every class center,
from a center-embed ONNX model.

Images: multipart `files` parts, or JSON `{"images": ["<base64>", ...]}` (data URIs
accepted). Any format Pillow reads; converted to RGB, shorter side resized to the model's
input size (bilinear), centre-cropped. Distances are squared Euclidean.

Errors are JSON `{"error": {"code": ..., "message": ...}}`. Timing headers on image
routes: `x-queue-time` and `x-inference-time`, in milliseconds.
"""


def create_app(settings: Settings | None = None, model: ServedModel | None = None) -> FastAPI:
    """An app for `settings` (default: from the environment). `model`: an already opened
    model to serve instead of opening `settings.model` (tests wrap one this way)."""
    settings = settings if settings is not None else Settings()
    if model is None and settings.model is None:
        raise UserError("no model to serve: set CENTER_EMBED_MODEL or give a model path")
    metrics = Metrics()
    app = FastAPI(
        title="center-embed",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keys = KeyChecker(settings.keys())
    app.state.given_model = model
    app.state.model = None
    app.state.batcher = None
    app.state.ready = False
    app.state.warmup_error = None
    install_handlers(app)
    app.include_router(open_router)
    app.include_router(api)
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
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state, settings = app.state, app.state.settings
    model = state.given_model
    if model is None:
        model = await asyncio.to_thread(
            ServedModel.open, settings.model, settings.device, settings.threads
        )
    state.metrics.set_model(model.info.unknown_threshold)
    state.model = model
    state.decoder = ThreadPoolExecutor(
        settings.decode_threads or os.cpu_count() or 1, thread_name_prefix="center-embed-decode"
    )
    state.batcher = MicroBatcher(
        lambda images: model.run(images),  # late-bound: a test may wrap model.run
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        metrics=state.metrics,
    )
    state.batcher.start()
    warm_up = asyncio.create_task(_warm_up(app, model))
    try:
        yield
    finally:
        state.ready = False
        state.metrics.ready.set(0)
        warm_up.cancel()
        await state.batcher.close()  # answers whatever is still queued
        state.decoder.shutdown(wait=True)
        log.info("stopped", extra={"fields": {"model": str(settings.model)}})


async def _warm_up(app: FastAPI, model: ServedModel) -> None:
    batch_sizes = tuple(sorted({1, min(8, app.state.settings.max_batch)}))
    try:
        await asyncio.to_thread(model.warm_up, batch_sizes)
    except Exception as e:
        app.state.warmup_error = str(e)
        log.exception("warm-up failed; the service stays not ready")
        return
    app.state.ready = True
    app.state.metrics.ready.set(1)
    log.info(
        "ready",
        extra={"fields": {"model": str(app.state.settings.model), "provider": model.provider}},
    )
