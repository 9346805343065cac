"""`score --engine ray` on a local 2-CPU Ray against the local scorer, in one run; a projection.

    .venv/bin/python benchmarks/bench_ray.py --model model.onnx \
        --images ../shared/data/cifar10/test [--rounds 2]

Side by side, alternating (so a load that comes and goes weighs on both): the local scorer
(center_embed.score.local, its defaults) and Ray Data (center_embed.score.ray) on a
local Ray started here with num_cpus=2, both reading the same JPEG folder and writing
Parquet. The Ray time includes starting the actors and the listing, not starting Ray itself
(a cluster is already up when a user submits); that start is printed apart. Both outputs
must agree (ids, labels, error rows; embeddings within 1e-6). Target: ratio >= 0.8.

Then the pieces of a projection, each measured here on one core: decode CPU ms per image,
inference images/s of one single-threaded onnxruntime session (what one CPU actor runs),
and Parquet bytes per row; and a table of throughput, time and cost for 50 million images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_json_argument, write_results

from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.score.local import score
from center_embed.score.ray import decode_paths, score_on_ray

TARGET = 0.8
IMAGES = 50_000_000
# Assumptions of the projection (not measured here): node shapes and on-demand prices.
CPU_NODE_CORES = 16  # e.g. a 16-vCPU compute node at about $0.70 an hour
CPU_NODE_PRICE = 0.70
GPU_NODE_CORES = 8  # e.g. one GPU with 8 vCPUs at about $1.20 an hour
GPU_NODE_PRICE = 1.20


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compare(local_out: Path, ray_out: Path) -> str:
    import pyarrow.parquet as pq

    a, b = pq.read_table(local_out), pq.read_table(ray_out)
    for column in ("id", "label", "error"):
        if a.column(column).to_pylist() != b.column(column).to_pylist():
            return f"DIFFERENT {column}"
    ea = np.array(a.column("embedding").to_pylist(), np.float64)
    eb = np.array(b.column("embedding").to_pylist(), np.float64)
    return f"same (ids, labels, errors; embeddings max diff {np.abs(ea - eb).max():.1e})"


def pieces(model_path: str, images: Path, ray_out: Path) -> dict[str, float]:
    """Decode ms/image (one core), single-session inference images/s, bytes per row."""
    model = OnnxModel(model_path, RuntimeOptions(device="cpu", threads=1))
    size = model.info.input_size[0]
    paths = sorted(str(p) for p in images.rglob("*.jpg"))[:2000]
    start = time.process_time()
    array, _ = decode_paths(paths, size)
    decode_ms = (time.process_time() - start) / len(paths) * 1000
    pixels = array[:2048]  # uint8 (n, size, size, 3)
    model.run(pixels[:256])  # warm-up
    start = time.process_time()
    for i in range(0, len(pixels), 256):
        model.run(pixels[i : i + 256])
    infer_ms = (time.process_time() - start) / len(pixels) * 1000
    written = sum(p.stat().st_size for p in ray_out.glob("part-*.parquet"))
    import pyarrow.parquet as pq

    rows = pq.read_metadata(next(ray_out.glob("part-*.parquet"))).num_rows
    rows = sum(pq.read_metadata(p).num_rows for p in ray_out.glob("part-*.parquet")) or rows
    return {"decode_ms": decode_ms, "infer_ms": infer_ms, "bytes_per_row": written / rows}


def projection(p: dict[str, float]) -> dict[str, float]:
    per_core = 1000 / (p["decode_ms"] + p["infer_ms"])  # one CPU actor: decode + infer
    decode_per_core = 1000 / p["decode_ms"]
    print(f"\none CPU actor (1 core: decode + inference): {per_core:,.0f} images/s")
    print(f"decode alone, one core: {decode_per_core:,.0f} images/s")
    print(f"output: {p['bytes_per_row']:.0f} bytes/row -> "
          f"{p['bytes_per_row'] * IMAGES / 1e9:.1f} GB for 50M rows")  # fmt: skip
    print("\n50M images | images/s | hours | cost (assumed prices) | first bottleneck")
    print("---|---|---|---|---")
    for nodes in (1, 8, 64):
        rate = nodes * CPU_NODE_CORES * per_core
        hours = IMAGES / rate / 3600
        print(f"{nodes} CPU node(s) x {CPU_NODE_CORES} cores | {rate:,.0f} | {hours:.2f} | "
              f"${hours * nodes * CPU_NODE_PRICE:,.2f} | inference CPU")  # fmt: skip
    for nodes in (1, 2, 4, 8):
        # GPU inference not measured here (no GPU); decode on the node's CPUs bounds it
        rate = nodes * (GPU_NODE_CORES - 1) * decode_per_core
        hours = IMAGES / rate / 3600
        cost = hours * nodes * GPU_NODE_PRICE
        print(f"{nodes} GPU node(s), {GPU_NODE_CORES} vCPU each | <= {rate:,.0f} | "
              f">= {hours:.2f} | ${cost:,.2f} | decoding CPUs")  # fmt: skip
    return p | {"actor_images_per_second": per_core, "decode_images_per_second": decode_per_core}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    add_json_argument(parser)
    args = parser.parse_args()
    import ray

    start_s, _ = timed(lambda: ray.init(num_cpus=2, include_dashboard=False,
                                        log_to_driver=False))  # fmt: skip
    print(f"local Ray start (not counted): {start_s:.1f} s")
    local_s, ray_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            local_out, ray_out = Path(tmp, f"local{r}.parquet"), Path(tmp, f"ray{r}")
            seconds, summary = timed(lambda o=local_out: score(args.model, args.images, o,
                                                               progress=False))  # fmt: skip
            local_s.append(seconds)
            seconds, summary = timed(lambda o=ray_out: score_on_ray(
                args.model, str(args.images), str(o), options=RuntimeOptions(device="cpu"),
                progress=False))  # fmt: skip
            ray_s.append(seconds)
            n = summary.rows
            print(f"round {r}: local {n / local_s[-1]:,.0f} images/s, "
                  f"ray {n / ray_s[-1]:,.0f} images/s; {compare(local_out, ray_out)}")  # fmt: skip
        local_rate, ray_rate = n / statistics.median(local_s), n / statistics.median(ray_s)
        ratio = ray_rate / local_rate
        print(f"\nmedian: local {local_rate:,.0f} images/s, ray (2 CPUs) {ray_rate:,.0f} "
              f"images/s; ratio {ratio:.2f} (target >= {TARGET})")  # fmt: skip
        pieces_ = projection(pieces(args.model, args.images, ray_out))
    ray.shutdown()
    results = {"images": n, "local_seconds": local_s, "ray_seconds": ray_s,
               "local_images_per_second": local_rate, "ray_images_per_second": ray_rate,
               "ratio": ratio, "target": TARGET, "projection": pieces_}  # fmt: skip
    write_results("ray", results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
