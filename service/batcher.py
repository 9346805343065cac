"""Coalescing concurrent requests into one onnxruntime run.

One asyncio task owns the queue and one thread owns onnxruntime (which uses every core for
a single run, so two runs at once would only fight). The policy:

- A request alone runs at once: no wait is added when nothing else is on the way.
- While a batch runs, new requests queue; the next batch takes all of them, up to
  `max_batch` images (a request is never split; one larger than `max_batch` runs alone).
- When other requests have announced themselves (they are still being decoded), a forming
  batch waits for them, at most `max_wait_s`, then runs with what it has.
- At most `max_queue` images are queued or being decoded: a request is admitted (`arrival`)
  before its images are decoded, and past the bound it is refused with QueueFull (HTTP 429)
  without spending any work on it.
- A request that is not answered within its timeout raises BatchTimeout (HTTP 504); if it
  was still queued it leaves the queue and never runs.
- `close` stops taking requests and finishes every queued one (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Outputs = dict[str, np.ndarray]


class QueueFull(Exception):
    pass


class BatchTimeout(Exception):
    pass


class Closed(Exception):
    pass


@dataclass
class BatchResult:
    outputs: Outputs  # this request's rows of each output
    queue_s: float  # from submit to the start of its batch's run
    inference_s: float  # the run of the whole batch
    batch_images: int  # images in that batch


@dataclass(eq=False)
class _Job:
    images: np.ndarray  # (n, H, W, 3) uint8
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)
    state: str = "queued"  # queued -> running | cancelled


class _Arrival:
    """An admitted request holding `images` places in the queue while it is decoded."""

    def __init__(self, batcher: MicroBatcher, images: int) -> None:
        self._batcher, self._images, self._pending = batcher, images, True

    def leave(self) -> None:
        if self._pending:
            self._pending = False
            self._batcher._arriving -= 1
            self._batcher._reserved -= self._images
            self._batcher._wake.set()

    async def submit(self, images: np.ndarray, timeout: float) -> BatchResult:
        self.leave()  # here now, no longer on the way: its places become queued images
        return await self._batcher.submit(images, timeout)


class MicroBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Any = None,  # service.prometheus.Metrics, or None
    ) -> None:
        self._run = run
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._metrics = metrics
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images waiting (not cancelled, not running)
        self._arriving = 0  # requests admitted but not yet submitted (being decoded)
        self._reserved = 0  # their images
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="center-embed-inference")
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def queued_images(self) -> int:
        return self._queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, stop the worker thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    @contextlib.asynccontextmanager
    async def arrival(self, images: int) -> AsyncIterator[_Arrival]:
        """Admit a request of `images` images before it is decoded (QueueFull past the
        bound), and announce it, so that a batch forming meanwhile waits for it. Submit
        through the yielded object."""
        self._check_room(images)
        arrival = _Arrival(self, images)
        self._arriving += 1
        self._reserved += images
        try:
            yield arrival
        finally:
            arrival.leave()

    async def submit(self, images: np.ndarray, timeout: float) -> BatchResult:
        """Queue (n, H, W, 3) uint8 images; their outputs once their batch has run."""
        n = len(images)
        self._check_room(n)
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._set_queued(self._queued + n)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            raise BatchTimeout(f"no answer within {timeout:g} s (queue and inference)") from None
        finally:
            if job.state == "queued":  # timed out or cancelled before its batch ran
                job.state = "cancelled"
                self._set_queued(self._queued - n)

    def _check_room(self, images: int) -> None:
        if self._closing:
            raise Closed("the service is shutting down")
        held = self._queued + self._reserved
        if held + images > self.max_queue:
            raise QueueFull(
                f"{held} images are queued or being decoded; {images} more would pass the "
                f"bound of {self.max_queue}"
            )

    # ------------------------------------------------------------------ the worker

    def _set_queued(self, value: int) -> None:
        self._queued = value
        if self._metrics is not None:
            self._metrics.queue_depth.set(value)

    def _take(self, batch: list[_Job], images: int) -> int:
        """Move queued jobs into `batch` while they fit; return the batch's image count."""
        while self._jobs:
            job = self._jobs[0]
            if job.state == "cancelled":
                self._jobs.popleft()
                continue
            if batch and images + len(job.images) > self.max_batch:
                break
            self._jobs.popleft()
            job.state = "running"
            self._set_queued(self._queued - len(job.images))
            batch.append(job)
            images += len(job.images)
        return images

    async def _next_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        while not batch:
            images = self._take(batch, 0)
            if batch:
                break
            if self._closing:
                return []
            self._wake.clear()
            await self._wake.wait()
        deadline = time.perf_counter() + self.max_wait_s
        while images < self.max_batch and self._arriving > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
            images = self._take(batch, images)
        return batch

    def _infer(self, parts: list[np.ndarray]) -> tuple[Outputs, float]:
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (N, H, W, 3)
        started = time.perf_counter()
        outputs = self._run(images)
        return outputs, time.perf_counter() - started

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                return  # closing, and nothing left to answer
            started = time.perf_counter()
            try:
                outputs, seconds = await loop.run_in_executor(
                    self._executor, self._infer, [job.images for job in batch]
                )
            except Exception as e:  # a failed run fails its requests, never the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            total = sum(len(job.images) for job in batch)
            if self._metrics is not None:
                self._metrics.observe_batch(total, len(batch), seconds)
            start = 0
            for job in batch:
                stop = start + len(job.images)
                if not job.future.done():
                    rows = {name: value[start:stop] for name, value in outputs.items()}
                    job.future.set_result(
                        BatchResult(rows, started - job.submitted, seconds, total)
                    )
                start = stop
