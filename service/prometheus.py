"""Prometheus metrics, one registry per app (so several apps in one test run never clash).

With `--workers N` the CLI sets PROMETHEUS_MULTIPROC_DIR, every worker writes its values
there, and /metrics on any worker reports the sum over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from center_embed.service.decode_pool import PoolObserver
from center_embed.service.error_codes import ErrorCode

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Min distance buckets as multiples of the calibrated unknown threshold: a drift in the
# input distribution shows as mass moving to the right of 1.
THRESHOLD_MULTIPLES = (0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0)
# Without a threshold: decades of either sign (an unknown score may be negative)
FALLBACK_DISTANCE_BUCKETS = (
    *(-(10.0**k) for k in range(5, -3, -1)),
    0.0,
    *(10.0**k for k in range(-2, 6)),
)

# Connections refused or aborted at the edge (service/protocol.py), before or outside any
# request the app sees: one counter per process, registered in every app's registry.
EDGE_CODES = (ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.HEADERS_TOO_LARGE, ErrorCode.HEADER_TIMEOUT)
WRITE_TIMEOUT = "write_timeout"  # not an error answer: the connection is aborted
EDGE_REASONS = (*(str(code) for code in EDGE_CODES), WRITE_TIMEOUT)
CONNECTION_REFUSALS = Counter(
    "center_embed_connection_refusals",
    "connections refused (503 too_many_connections, 431 headers_too_large, 408 "
    "header_timeout) or aborted (write_timeout: the peer did not read) at the edge",
    ["reason"],
    registry=None,
)
for _reason in EDGE_REASONS:
    CONNECTION_REFUSALS.labels(_reason)  # every reason exported, at 0 until it happens


DECODE_POOLS = ("small", "large")


class DecodePoolMetrics(PoolObserver):
    """A decode pool's calls in flight and replaced workers, as the service's metrics."""

    def __init__(self, busy: Gauge, replaced: Counter) -> None:
        self._busy, self._replaced = busy, replaced

    def busy(self, change: int) -> None:
        self._busy.inc(change)

    def replaced(self) -> None:
        self._replaced.inc()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the service exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        by_route = ["route", "method", "status"]
        self.requests = Counter(
            "center_embed_requests", "HTTP requests by route, method and status", by_route,
            registry=r,
        )  # fmt: skip
        self.latency = self._histogram(
            "center_embed_request_duration_seconds", "HTTP request latency", LATENCY_BUCKETS,
            by_route,
        )  # fmt: skip
        self.images = Counter(
            "center_embed_images", "images received, by route", ["route"], registry=r
        )
        self.batch_images = self._histogram(
            "center_embed_batch_images", "images per onnxruntime run", BATCH_BUCKETS
        )
        self.batch_requests = self._histogram(
            "center_embed_batch_requests", "requests coalesced into one onnxruntime run",
            BATCH_BUCKETS,
        )  # fmt: skip
        self.inference = self._histogram(
            "center_embed_inference_seconds", "duration of one onnxruntime run", LATENCY_BUCKETS
        )
        self.queue_time = self._histogram(
            "center_embed_queue_seconds", "time a request waited for its batch to start",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "center_embed_queue_images", "images waiting for a batch",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "center_embed_ready", "1 once the model is loaded and warmed up",
            multiprocess_mode="livemin", registry=r,
        )  # fmt: skip
        self.unknown = Counter(
            "center_embed_unknown", "images beyond the unknown threshold", registry=r
        )
        self.atypical = Counter(
            "center_embed_atypical",
            "images with an atypicality above 0 (unlike the training images; a drift signal)",
            registry=r,
        )
        self.enrolments = Counter(
            "center_embed_enrolments", "changes to the classes: enrol, add (images), remove",
            ["action"], registry=r,
        )  # fmt: skip
        self.centers_version = Gauge(
            "center_embed_centers_version", "version of the centers served (0: the model's own)",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self._add_decode_metrics()
        self.unknown_score: Histogram | None = None
        r.register(CONNECTION_REFUSALS)
        self.connection_refusals = CONNECTION_REFUSALS

    def _histogram(
        self, name: str, text: str, buckets: tuple[float, ...], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(name, text, labels, buckets=buckets, registry=self.registry)

    def set_model(self, unknown_threshold: float | None) -> None:
        """The unknown-score histogram's buckets follow the model's threshold."""
        if self.unknown_score is not None:
            return
        if unknown_threshold:  # around it, either sign (‖e − c‖² − ‖e‖² is often negative)
            scale = abs(unknown_threshold)
            buckets = tuple(unknown_threshold + scale * (m - 1) for m in THRESHOLD_MULTIPLES)
            text = f"unknown score of each classified image (threshold {unknown_threshold:.4g})"
        else:
            buckets, text = FALLBACK_DISTANCE_BUCKETS, "unknown score of each classified image"
        self.unknown_score = self._histogram(
            "center_embed_unknown_score", text + "; a drift signal", buckets
        )

    def _add_decode_metrics(self) -> None:
        self.decode_busy = Gauge(
            "center_embed_decode_busy", "decode calls in flight (each holds a worker process), "
            "by pool: small or large images", ["pool"], multiprocess_mode="livesum",
            registry=self.registry,
        )  # fmt: skip
        self.decode_replaced = Counter(
            "center_embed_decode_workers_replaced", "decode worker processes killed past a "
            "deadline or dead, and replaced, by pool", ["pool"], registry=self.registry,
        )  # fmt: skip
        for pool in DECODE_POOLS:  # exported at 0 from the start
            self.decode_busy.labels(pool)
            self.decode_replaced.labels(pool)

    def decode_pool(self, pool: str) -> DecodePoolMetrics:
        """The observer that counts a decode pool's work here (service/decode_pool.py)."""
        return DecodePoolMetrics(self.decode_busy.labels(pool), self.decode_replaced.labels(pool))

    def observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        self.inference.observe(seconds)

    def observe_scores(self, unknown_scores, unknown, atypicality) -> None:
        if self.unknown_score is not None:
            for value in unknown_scores.tolist():
                self.unknown_score.observe(value)
        self.unknown.inc(int(unknown.sum()))
        self.atypical.inc(int((atypicality > 0).sum()))

    def exposition(self) -> tuple[bytes, str]:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
