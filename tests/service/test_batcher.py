"""The micro-batcher: its policy on its own (no wait when alone, one batch for what queued
during a run, admission of requests still decoding, timeouts, close), and through the app
(429 when the queue is full, 504 past the timeout, fifty concurrent requests coalesced)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from center_embed.runtime import RuntimeOptions
from center_embed.service.batcher import BatchTimeout, MicroBatcher, QueueFull
from center_embed.service.served_model import ServedModel
from tests.helpers import (
    API_KEY,
    Gate,
    answer,
    encode,
    error,
    metric_samples,
    multipart,
    running,
    tiny_images,
)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the event loop run until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


def test_batcher_policy():
    """Alone: no wait. Queued during a run: one batch. Over max_batch: alone. A request
    that times out while queued never runs. close() answers what is queued."""
    calls: list[int] = []
    hold = threading.Event()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(images))
        hold.wait(5)
        return {"x": images[:, 0, 0, 0].astype(np.float32)}

    def images(n: int, value: int = 0) -> np.ndarray:
        return np.full((n, 1, 1, 3), value, np.uint8)

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch=4, max_wait_s=1.0, max_queue=9)
        batcher.start()
        hold.set()
        started = time.perf_counter()
        async with batcher.arrival(1) as arrival:
            result = await arrival.submit(images(1), timeout=5)
        assert time.perf_counter() - started < 0.5  # max_wait_s is 1 s: it was not waited
        assert result.batch_images == 1 and calls == [1]

        hold.clear()
        first = asyncio.create_task(batcher.submit(images(1, 1), 5))
        await until(lambda: len(calls) == 2)  # the first is running, held
        queued = [asyncio.create_task(batcher.submit(images(n, 10 + n), 5)) for n in (2, 1)]
        too_big = asyncio.create_task(batcher.submit(images(5, 5), 5))
        await until(lambda: batcher.queued_images == 2 + 1 + 5)
        with pytest.raises(QueueFull):
            await batcher.submit(images(2), 5)  # 2 + 1 + 5 queued: two more pass 9
        doomed = asyncio.create_task(batcher.submit(images(1, 9), 0.05))
        with pytest.raises(BatchTimeout):
            await doomed
        hold.set()
        results = await asyncio.gather(first, *queued, too_big)
        assert calls == [1, 1, 3, 5]  # [2, 1] together; the 5 alone; the timed-out never
        np.testing.assert_array_equal(results[1].outputs["x"], [12, 12])
        np.testing.assert_array_equal(results[2].outputs["x"], [11])
        assert results[1].batch_images == 3

        hold.clear()
        running_task = asyncio.create_task(batcher.submit(images(1, 1), 5))
        await until(lambda: len(calls) == 5)  # running, held
        last = asyncio.create_task(batcher.submit(images(2, 7), 5))
        await until(lambda: batcher.queued_images == 2)
        closing = asyncio.create_task(batcher.close())
        await until(lambda: batcher._closing)  # closing while one runs and one is queued
        hold.set()
        await closing
        assert (await running_task).batch_images == 1
        np.testing.assert_array_equal((await last).outputs["x"], [7, 7])

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_batch_waits_for_requests_on_the_way():
    """A request announced (still decoding) is waited for, up to max_wait_s."""
    calls: list[int] = []

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(images))
        return {"x": np.zeros(len(images), np.float32)}

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.5, max_queue=8)
        batcher.start()
        one = np.zeros((1, 1, 1, 3), np.uint8)

        async def late(decoded: Callable[[], bool]) -> None:
            async with batcher.arrival(1) as arrival:
                await until(decoded)  # "decoding"
                await arrival.submit(one, 5)

        # The second is decoded once the first is in a batch that waits for it: the first
        # submitted (one request left on the way) and taken from the queue.
        taken = lambda: batcher._arriving == 1 and batcher.queued_images == 0  # noqa: E731
        await asyncio.gather(late(lambda: True), late(taken))
        with pytest.raises(QueueFull):  # admission counts the images being decoded too
            async with batcher.arrival(5), batcher.arrival(4):
                pass
        assert (batcher._queued, batcher._reserved, batcher._arriving) == (0, 0, 0)
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert calls == [2]


def test_queue_full_answers_429_and_timeout_504(tiny_onnx, images):
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    gate = Gate(served)
    settings = {"max_queue": 2, "max_images": 2, "max_batch": 2, "timeout_s": 5}
    with running(tiny_onnx, served, **settings) as client, ThreadPoolExecutor(2) as pool:
        gate.opened.clear()
        gate.entered.clear()
        first = pool.submit(client.post, "/v1/embed", files=multipart(images[0]))
        assert gate.entered.wait(10)  # the first request's batch is running, held
        second = pool.submit(client.post, "/v1/embed", files=multipart(images[1], images[2]))
        batcher = client.app.state.batcher
        deadline = time.monotonic() + 10
        while batcher.queued_images < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        response = client.post("/v1/embed", files=multipart(images[3]))
        assert answer(response) == error(
            429,
            "queue_full",
            "2 images are queued or being decoded; 1 more would pass the bound of 2",
        )
        assert response.headers["retry-after"] == "1"
        gate.opened.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert gate.batches[-2:] == [1, 2]

    with running(tiny_onnx, served, timeout_s=0.2) as client:
        gate.opened.clear()
        started = time.monotonic()
        response = client.post("/v1/classify", files=multipart(images[0]))
        assert answer(response) == error(
            504, "timeout", "no answer within 0.2 s (queue and inference)"
        )
        assert time.monotonic() - started < 2
        gate.opened.set()
        assert client.post("/v1/classify", files=multipart(images[0])).status_code == 200


def test_fifty_concurrent_requests_are_batched(live, reference):
    pixels = tiny_images(50, seed=3)
    files = [encode(p) for p in pixels]
    ref = reference.run(np.stack(pixels))
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def batch_counts() -> tuple[float, float]:
        text = httpx.get(f"{live.url}/metrics").text
        samples = metric_samples(text)
        singles = samples[("center_embed_batch_requests_bucket", (("le", "1.0"),))]
        return samples[("center_embed_batch_requests_count", ())], singles

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        response = await client.post(
            "/v1/classify?return_embeddings=true",
            files=[("files", (f"{i}.png", files[i], "image/png"))],
        )
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    async def all_at_once() -> list[dict]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=live.url, headers=headers, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    runs_before, singles_before = batch_counts()
    results = asyncio.run(asyncio.wait_for(all_at_once(), 60))
    runs_after, singles_after = batch_counts()
    for i, result in enumerate(results):
        assert result["label"] == int(ref["labels"][i])
        np.testing.assert_allclose(result["embedding"], ref["embeddings"][i], rtol=1e-4, atol=1e-5)
    runs = runs_after - runs_before
    assert runs < 50  # coalesced: fewer onnxruntime runs than requests
    assert runs - (singles_after - singles_before) >= 1  # some run held more than one request
