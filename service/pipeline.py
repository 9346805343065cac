"""A request's images through the service: read them, decode them in the decode pool,
run them in a batch (`ImagePipeline`). Built once, when the app starts (service/app.py), and
given to the image routes by service/deps.py.

An image request's `timeout_s` starts once its body is in and covers decoding, the queue
and inference (504 past it); every output is checked finite before it is serialised (a
non-finite value is a 422 naming the input, never a 500 from the JSON encoder).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request

from center_embed.service.batcher import BatchResult, BatchTimeout, Closed, MicroBatcher, QueueFull
from center_embed.service.decode_pool import DecodeExecutor
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError
from center_embed.service.images import (
    ImageLimits,
    ImagePart,
    decode_part,
    image_parts,
    probe_parts,
    require_nonempty,
)
from center_embed.service.prometheus import Metrics
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings


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
    refuse them (a 500), and no client can use them. A finite sum of every value is proof
    enough (NaN and infinity carry into a sum), so rows are looked at only when it is not."""
    floats = [value for value in outputs.values() if value.dtype.kind == "f"]
    total = sum(float(np.add.reduce(value.ravel(), dtype=np.float64)) for value in floats)
    if math.isfinite(total):
        return
    bad = np.zeros(len(names), bool)
    for value in floats:
        bad |= ~np.isfinite(value.reshape(len(names), -1)).all(1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ApiError(
            ErrorCode.NON_FINITE_OUTPUT,
            f"the model's outputs for {names[first]} are not finite (NaN or infinite); "
            f"{int(bad.sum())} of {len(names)} inputs affected",
        )
