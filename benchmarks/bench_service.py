"""Throughput, latency and CPU per request of `center-embed serve`, from a separate process.

    python benchmarks/bench_service.py model.onnx --images ../shared/data/cifar10/test
    python benchmarks/bench_service.py --checkpoint runs/cpu/best.pt   # exports it first
    python benchmarks/bench_service.py model.onnx --runtime onnxruntime --precision fp32

1. The service under uvicorn on 127.0.0.1 (`center-embed serve`, one worker, its default
   runtime unless --runtime), loaded by `--concurrency` clients each sending one image per
   request, for `--seconds`: images/s, the status codes (only 429s may be non-200), the
   batch sizes the server formed, the server's resident memory over the run (flat?), and
   the server's CPU time per request: its process tree's (the event loop thread, its other
   threads, the decode worker processes) CPU seconds from /proc over the requests answered,
   a figure the load generator's own CPU does not blur.
2. After each load round, the same runtime and precision alone, in this process, on the
   images decoded beforehand, at the batch size the server formed: images/s and CPU per
   image. The ratios: throughput (target >= 0.7) and server CPU per request over runtime
   CPU per image (target <= 2).
3. Concurrency 1: p50 and p99 latency of a single-image /v1/classify (target p50 <= 10 ms).

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams with the
request bytes prepared once, so that on a small machine it takes as little CPU from the
server as it can. Everything is bounded in time; the server is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _common import (
    add_json_argument,
    cpu_per_request_ms,
    http_get,
    load,
    load_files,
    multipart,
    request,
    serve,
    tree_cpu_seconds,
    write_results,
)

TARGET_RATIO = 0.7
TARGET_P50_MS = 10.0
# Server CPU per request (its process tree) over the runtime's CPU per image in process
TARGET_CPU_RATIO = 2.0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", nargs="?", help="an exported ONNX model")
    p.add_argument("--checkpoint", help="export this checkpoint first (fp32, verified)")
    p.add_argument("--images", help="a folder of image files to send (default: synthetic PNGs)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="length of one load round")
    p.add_argument("--rounds", type=int, default=3, help="baseline/service rounds (median)")
    p.add_argument("--single", type=int, default=500, help="requests at concurrency 1")
    p.add_argument("--threads", type=int, default=0, help="runtime threads (0: all cores)")
    p.add_argument("--runtime", help="the server's --runtime (default: serve's own default)")
    p.add_argument("--precision", default="auto", help="the server's --precision, with --runtime")
    add_json_argument(p)
    args = p.parse_args()
    model = Path(args.model) if args.model else None
    if args.checkpoint:
        from center_embed.export.onnx_export import export_checkpoint

        model = export_checkpoint(args.checkpoint, Path(tempfile.mkdtemp()) / "model.onnx")
    if model is None:
        p.error("give a model or --checkpoint")

    files = load_files(args.images, 512)
    print(f"model {model}; {len(files)} distinct images; {os.cpu_count()} CPUs; "
          f"concurrency {args.concurrency}; {args.rounds} rounds of {args.seconds:g} s load; "
          f"load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
    env = {"CENTER_EMBED_THREADS": str(args.threads)}
    if args.runtime:
        env |= {"CENTER_EMBED_RUNTIME": args.runtime, "CENTER_EMBED_PRECISION": args.precision}
    with serve(model, env) as server:
        body = [multipart(data) for data in files]
        asyncio.run(load(server.port, body[:8], 8, 1.0, server.pid))  # warm the connections
        served = json.loads(http_get(server.port, "/v1/model")[1])["runtime"]
        print(f"served by {served['runtime']} {served['precision']} ({served['reason']})")
        baseline = Baseline(model, files, runtime_options(served, args.threads))
        results = {"model": str(model), "concurrency": args.concurrency, "runtime": served}
        results["load"] = rounds(server, baseline, body, args)
        latencies = asyncio.run(sequential(server.port, body, args.single))
    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"concurrency 1, single image, {len(latencies)} requests: p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms (target p50 <= {TARGET_P50_MS:g} ms); load average after: "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    results["single"] = {"requests": len(latencies), "p50_ms": p50, "p99_ms": p99,
                         "target_p50_ms": TARGET_P50_MS}  # fmt: skip
    results["server_exit_status"] = server.exit_code
    write_results("service", results, args.json)
    return 0


def rounds(server, baseline: Baseline, body: list[bytes], args) -> dict:
    """Interleaved rounds of the service under load and its runtime alone: the ratios."""
    ratios, cpu_ratios, rates, rss, statuses, cpus = [], [], [], [], Counter(), []
    batches = []
    for r in range(args.rounds):
        # Interleaved, so both sides see the same machine (it may be shared).
        before, cpu_before = batch_histogram(server.port), tree_cpu_seconds(server.pid)
        result = asyncio.run(load(server.port, body, args.concurrency, args.seconds, server.pid))
        cpu = cpu_per_request_ms(cpu_before, tree_cpu_seconds(server.pid), result["ok"])
        after = batch_histogram(server.port)
        batch = (after["sum"] - before["sum"]) / max(after["count"] - before["count"], 1)
        # The runtime alone at the batch size the batcher formed, on the decoded images.
        base_rate, base_cpu = baseline.measure(max(1, round(batch)), 2.0)
        rate = result["ok"] / result["seconds"]
        rates.append(rate)
        ratios.append(rate / base_rate)
        cpu_ratios.append(cpu["total"] / base_cpu)
        cpus.append(cpu)
        batches.append(batch)
        rss += result["rss_mb"]
        statuses.update(result["statuses"])
        print(f"round {r + 1}: service {rate:6.1f} images/s, mean batch {batch:.1f}, server CPU "
              f"{cpu['total']:.2f} ms/request (event loop {cpu['event_loop']:.2f}, threads "
              f"{cpu['threads']:.2f}, decode workers {cpu['workers']:.2f}); runtime alone at "
              f"batch {round(batch)}: {base_rate:6.1f} images/s, {base_cpu:.2f} CPU ms/image; "
              f"throughput ratio {ratios[-1]:.2f}, CPU ratio {cpu_ratios[-1]:.2f}")  # fmt: skip
    ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
    print(f"median of {args.rounds}: service / runtime alone throughput {ratio:.2f} (target >= "
          f"{TARGET_RATIO}); server CPU per request / runtime CPU per image {cpu_ratio:.2f} "
          f"(target <= {TARGET_CPU_RATIO:g})")  # fmt: skip
    errors = sum(n for status, n in statuses.items() if status not in (200, 429))
    print(f"  statuses {dict(statuses)}; errors other than 429: {errors}")
    half = len(rss) // 2
    print(f"  server RSS MB over the load: start {rss[0]:.0f}, max {max(rss):.0f}, end "
          f"{rss[-1]:.0f}; first half mean {statistics.mean(rss[:half]):.1f}, second half "
          f"{statistics.mean(rss[half:]):.1f}")  # fmt: skip
    return {"requests_per_second": statistics.median(rates), "rounds_requests_per_second": rates,
            "ratios": ratios, "median_ratio": ratio, "target_ratio": TARGET_RATIO,
            "server_cpu_ms_per_request": cpus, "cpu_ratios": cpu_ratios,
            "median_cpu_ratio": cpu_ratio, "target_cpu_ratio": TARGET_CPU_RATIO,
            "statuses": statuses, "errors_other_than_429": errors, "mean_batches": batches,
            "mean_batch": statistics.median(batches),
            "rss_mb": {"start": rss[0], "max": max(rss), "end": rss[-1]}}  # fmt: skip


# --------------------------------------------------------------------------- inputs


def runtime_options(served: dict, threads: int):
    """The RuntimeOptions that open the model as the server did (its /v1/model runtime)."""
    from center_embed.runtime import RuntimeOptions

    return RuntimeOptions("cpu", threads, served["runtime"], served["precision"])


class Baseline:
    """OnnxModel.run alone, in this process, on images decoded beforehand."""

    def __init__(self, model: Path, files: list[bytes], options) -> None:
        from center_embed.runtime import OnnxModel

        # As the service opens it (no spinning threads), with the runtime it chose.
        self.onnx = OnnxModel(model, options, spinning=False)
        self.decoded = np.stack([self.onnx.decode(data) for data in files])

    def measure(self, batch: int, seconds: float) -> tuple[float, float]:
        """(images/s, CPU ms per image) at `batch` images per run, over `seconds`."""
        self.onnx.run(self.decoded[:batch])
        starts = range(0, len(self.decoded) - batch + 1, batch)
        started, cpu, n = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - started < seconds:
            i = starts[n % len(starts)]
            self.onnx.run(self.decoded[i : i + batch])
            n += 1
        images = n * batch
        cpu_ms = (time.process_time() - cpu) / images * 1000
        return images / (time.perf_counter() - started), cpu_ms


# --------------------------------------------------------------------------- the server's figures


def batch_histogram(port: int) -> dict[str, float]:
    text = http_get(port, "/metrics")[1].decode()
    values = {}
    for line in text.splitlines():
        for key in ("count", "sum"):
            if line.startswith(f"center_embed_batch_images_{key} "):
                values[key] = float(line.split()[1])
    return values


async def sequential(port: int, bodies: list[bytes], n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies = []
    try:
        for i in range(n + 20):
            started = time.perf_counter()
            status = await asyncio.wait_for(request(reader, writer, bodies[i % len(bodies)]), 10)
            if status != 200:
                raise SystemExit(f"status {status} at concurrency 1")
            if i >= 20:  # the first few warm the path
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        writer.close()
    return latencies


if __name__ == "__main__":
    sys.exit(main())
