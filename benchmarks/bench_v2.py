"""The Open Inference Protocol's binary infer against /v1 multipart classify and against
onnxruntime in process: the same images, 1 and 32 concurrent clients, images/s and p50/p99.

    python benchmarks/bench_v2.py model.onnx --images ../shared/data/cifar10/test

1. onnxruntime alone, in this process, on the images decoded beforehand, at batch size 1
   and at batch size 32 (what the server's batcher can form from 32 clients).
2. `center-embed serve` under uvicorn on 127.0.0.1 (one worker, another process), loaded by
   1 and by 32 keep-alive clients, each request one image: POST /v2/models/center_embed/infer
   with the pixels as a binary tensor (Inference-Header-Content-Length, all outputs binary),
   and POST /v1/classify with the encoded file as a multipart part (the server decodes it).
   Rounds interleave the three, so that each sees the same (possibly shared) machine.

Targets: v2 binary at concurrency 32 >= 0.85x onnxruntime at batch 32; v2 p50 <= 5 ms at
concurrency 1. The load generator and the request bytes come from _common.py (bytes
prepared once, a minimal keep-alive HTTP/1.1 client), so both routes pay the same client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter

import numpy as np
from _common import add_json_argument, load, load_files, multipart, serve, write_results

from center_embed.contract import PROTOCOL_MODEL_NAME
from center_embed.runtime import OnnxModel, RuntimeOptions

TARGET_RATIO = 0.85
TARGET_P50_MS = 5.0
INFER = f"/v2/models/{PROTOCOL_MODEL_NAME}/infer"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="an exported ONNX model")
    p.add_argument("--images", help="a folder of image files (default: synthetic PNGs)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of one load round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency (median)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    add_json_argument(p)
    args = p.parse_args()

    files = load_files(args.images, 256)
    onnx = OnnxModel(args.model, RuntimeOptions(device="cpu", threads=args.threads))
    pixels = np.stack([onnx.decode(data) for data in files])  # (n, H, W, 3) uint8
    bodies = {"v2 binary": [v2_binary(image) for image in pixels],
              "v1 multipart": [multipart(data) for data in files]}  # fmt: skip
    print(f"model {args.model}; {len(files)} distinct images {pixels.shape[1:]}; "
          f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip

    with serve(args.model, {"CENTER_EMBED_THREADS": str(args.threads)}) as server:
        check_answer(server.port, bodies["v2 binary"][0], onnx.run(pixels[:1]))
        for name in bodies:  # warm the connections and caches
            asyncio.run(load(server.port, bodies[name][:8], 8, 1.0))
        results = {c: measure(onnx, pixels, bodies, server.port, c, args) for c in (1, 32)}
    summary = report(results)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    write_results("v2", {"model": args.model, "by_clients": results, **summary}, args.json)
    return 0


def v2_binary(image: np.ndarray) -> bytes:
    """One image as a complete HTTP request: JSON header, then the pixels, all outputs binary."""
    header = json.dumps({
        "inputs": [{"name": "images", "shape": [1, *image.shape], "datatype": "UINT8",
                    "parameters": {"binary_data_size": image.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
        f"{len(header) + image.nbytes}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n\r\n"
    ).encode()
    return head + header + image.tobytes()


def check_answer(port: int, raw: bytes, expected: dict[str, np.ndarray]) -> None:
    """One v2 request, its binary answer parsed: the labels must be onnxruntime's."""
    import http.client

    head, body = raw.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", INFER, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    length = int(response.getheader("Inference-Header-Content-Length"))
    answer, offset = json.loads(data[:length]), length
    for output in answer["outputs"]:
        size = output["parameters"]["binary_data_size"]
        if output["name"] == "labels":
            labels = np.frombuffer(data[offset : offset + size], "<i8")
            assert labels.tolist() == expected["labels"].tolist(), (labels, expected["labels"])
        offset += size
    print(f"v2 binary answer checked against onnxruntime (labels {labels.tolist()})")


# --------------------------------------------------------------------------- measuring


def measure(onnx, pixels, bodies, port: int, clients: int, args) -> dict[str, dict]:
    """Per side: median images/s over the rounds and p50/p99 latency over all requests."""
    rates: dict[str, list[float]] = {name: [] for name in ("onnxruntime", *bodies)}
    latencies: dict[str, list[float]] = {name: [] for name in rates}
    statuses: Counter = Counter()
    batches = [pixels[i : i + clients] for i in range(0, len(pixels) - clients + 1, clients)]
    sides = list(rates)
    for r in range(args.rounds):
        # The order rotates: the side run right after onnxruntime in process would otherwise
        # always share the cores with its intra-op threads while they spin down.
        for name in sides[r % 3 :] + sides[: r % 3]:
            if name == "onnxruntime":
                rate, times = in_process(onnx, batches, args.seconds / 2)
                time.sleep(0.5)
            else:
                result = asyncio.run(load(port, bodies[name], clients, args.seconds))
                rate, times = result["ok"] / result["seconds"], result["latencies"]
                statuses.update({(name, s): n for s, n in result["statuses"].items()})
            rates[name].append(rate)
            latencies[name] += times
    summary = {}
    for name in rates:
        p50, p99 = np.percentile(latencies[name], [50, 99])
        summary[name] = {"rate": statistics.median(rates[name]), "p50": p50, "p99": p99,
                         "rounds": rates[name]}  # fmt: skip
    print(f"concurrency {clients}: statuses {dict(statuses)}")
    return summary


def in_process(onnx, batches: list[np.ndarray], seconds: float) -> tuple[float, list[float]]:
    """onnxruntime alone: images/s and the latency of each run (ms)."""
    onnx.run(batches[0])
    times, n, started = [], 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        onnx.run(batches[n % len(batches)])
        times.append((time.perf_counter() - t) * 1000)
        n += 1
    return n * len(batches[0]) / (time.perf_counter() - started), times


def report(results: dict[int, dict[str, dict]]) -> dict[str, float]:
    print(f"\n{'':14}{'clients':>8}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}  rounds (images/s)")
    for clients, sides in results.items():
        for name, r in sides.items():
            rounds = ", ".join(f"{v:.0f}" for v in r["rounds"])
            print(f"{name:14}{clients:>8}{r['rate']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}  "
                  f"{rounds}")  # fmt: skip
    high, low = results[32], results[1]
    ratio = high["v2 binary"]["rate"] / high["onnxruntime"]["rate"]
    v1 = high["v1 multipart"]["rate"] / high["onnxruntime"]["rate"]
    print(f"\nconcurrency 32: v2 binary / onnxruntime at batch 32 = {ratio:.2f} (target >= "
          f"{TARGET_RATIO}); v1 multipart / onnxruntime = {v1:.2f}")  # fmt: skip
    print(f"concurrency 1: v2 binary p50 {low['v2 binary']['p50']:.2f} ms (target <= "
          f"{TARGET_P50_MS:g} ms); v1 multipart p50 {low['v1 multipart']['p50']:.2f} ms; "
          f"onnxruntime batch 1 p50 {low['onnxruntime']['p50']:.2f} ms")  # fmt: skip
    return {"v2_over_onnxruntime_at_32": ratio, "v1_over_onnxruntime_at_32": v1,
            "target_ratio": TARGET_RATIO, "target_p50_ms": TARGET_P50_MS}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
