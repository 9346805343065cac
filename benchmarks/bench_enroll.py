"""Enrolment without retraining, measured: issue 14's protocol.

    python benchmarks/bench_enroll.py --base /work/q/base-split0-s0/best.pt \\
        --all /work/q/base-all-s0/best.pt --data ../shared/data/cifar10

1. Accuracy. Each --base model was trained on 6 CIFAR-10 classes. The other 4 are enrolled
   (center_embed.enrolment: the mean embedding in the model's score space, as PUT
   /v1/centers does) from k = 1, 5, 20, 100 training images each, drawn at random (seeded;
   10, 5, 3, 1 draws). Nearest-center accuracy on the test images of the 4 enrolled classes,
   of the 6 old ones and of all 10, side by side with the --all model (trained on all 10)
   on the same images, and with the base model on its 6 old classes before enrolment.
   Targets at k = 20: the 4 enrolled classes within 15 points of the all-10 model; the 6
   old classes lose at most 2 points.
2. HTTP (the first --base model under `center-embed serve`, one worker, a separate
   process): p50 latency of PUT /v1/centers/{name} with 20 images; classify throughput
   (single-image requests from --concurrency clients) while an enrolment runs every
   --enrol-interval seconds, against the same load without enrolments, interleaved rounds,
   median ratio (target: at most a 10% drop, ratio >= 0.9).

A .pt is exported first (`center-embed export`, into --work); an .onnx is used as it is.
Prints the results and writes them (benchmarks/results/enroll-<date>.json, or --json FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import add_json_argument, load, multipart, serve, write_results

from center_embed.contract import read_centers
from center_embed.data import load_for_classes
from center_embed.enrolment import CenterSet
from center_embed.fileio import sha256_file
from center_embed.runtime import OnnxModel, RuntimeOptions

KS = (1, 5, 20, 100)
DRAWS = {1: 10, 5: 5, 20: 3, 100: 1}
TARGET_K, TARGET_NEW_POINTS, TARGET_OLD_POINTS, TARGET_RATIO = 20, 15.0, 2.0, 0.9
ADMIN = "bench-admin-key"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", nargs="+", required=True, help="6-class models (.pt or .onnx)")
    p.add_argument("--all", required=True, help="the model trained on all 10 classes")
    p.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 (folders)")
    p.add_argument("--work", default="/tmp/bench_enroll", help="exports and scratch files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-http", action="store_true", help="accuracy only")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0, help="one throughput round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--enrol-interval", type=float, default=0.5, help="s between enrolments")
    add_json_argument(p)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; data {args.data}")
    all_model = OnnxModel(as_onnx(args.all, work, args.data), RuntimeOptions(device="cpu"))
    dataset = load_for_classes(args.data, all_model.info.class_names)
    reference = all_model.run_batched(dataset.test.images)["labels"]  # all-10 predictions
    results = {"all": args.all, "bases": []}
    for base in args.base:
        results["bases"].append(measure_base(base, work, args, dataset, reference))
    results["summary"] = summarise(results["bases"])
    if not args.no_http:
        results["http"] = measure_http(as_onnx(args.base[0], work, args.data), dataset, args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    write_results("enroll", results, args.json)
    return 0


def as_onnx(path: str, work: Path, data: str) -> Path:
    """An .onnx as it is; a .pt exported once into `work` (named after its run folder)."""
    source = Path(path)
    if source.suffix == ".onnx":
        return source
    out = work / f"{source.parent.name}.onnx"
    if not out.exists():
        print(f"exporting {source} -> {out}")
        command = [sys.executable, "-m", "center_embed.cli", "export", str(source),
                   "--out", str(out), "--data", data]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


# --------------------------------------------------------------------------- accuracy


def measure_base(base: str, work: Path, args, dataset, reference: np.ndarray) -> dict:
    path = as_onnx(base, work, args.data)
    model = OnnxModel(path, RuntimeOptions(device="cpu"))
    names10 = list(dataset.class_names)
    known = model.info.class_names
    unseen = [c for c in names10 if c not in known]
    truth = dataset.test.labels
    is_new = np.isin(truth, [names10.index(c) for c in unseen])
    test = model.run_batched(dataset.test.images)["embeddings"]
    centers = CenterSet.from_model(model.info, read_centers(path), sha256_file(path))
    before = accuracy(centers, test[~is_new], truth[~is_new], names10)
    all10 = {
        "new4": float((reference[is_new] == truth[is_new]).mean()),
        "old6": float((reference[~is_new] == truth[~is_new]).mean()),
        "all10": float((reference == truth).mean()),
    }
    print(f"\n{base}: known {', '.join(known)}; enrolled {', '.join(unseen)}")
    print(f"  base model on its 6 classes' test images: {before:.4f}; all-10 model: new 4 "
          f"{all10['new4']:.4f}, old 6 {all10['old6']:.4f}, "
          f"all 10 {all10['all10']:.4f}")  # fmt: skip
    draws = drawn_indices(dataset.train.labels, [names10.index(c) for c in unseen], args.seed)
    needed = np.unique(np.concatenate([i for d in draws.values() for i in d]))
    train = dict(zip(needed.tolist(), model.run_batched(dataset.train.images[needed])
                     ["embeddings"], strict=True))  # fmt: skip
    rows = {}
    for k, per_draw in draws.items():
        scores = []
        for index in per_draw:
            enrolled = centers
            for c in unseen:
                mine = [i for i in index if names10[dataset.train.labels[i]] == c]
                embeddings = np.stack([train[i] for i in mine])
                enrolled = enrolled.with_class(c, embeddings, info=model.info, source="bench")
            scores.append({
                "new4": accuracy(enrolled, test[is_new], truth[is_new], names10),
                "old6": accuracy(enrolled, test[~is_new], truth[~is_new], names10),
                "all10": accuracy(enrolled, test, truth, names10),
            })  # fmt: skip
        rows[k] = {key: [s[key] for s in scores] for key in ("new4", "old6", "all10")}
        print(f"  k={k:3d} ({len(scores):2d} draws): new 4 {fmt(rows[k]['new4'])}  old 6 "
              f"{fmt(rows[k]['old6'])}  all 10 {fmt(rows[k]['all10'])}")  # fmt: skip
    return {"model": base, "unseen": unseen, "base_old6": before, "all10": all10, "k": rows}


def drawn_indices(labels: np.ndarray, classes: list[int], seed: int) -> dict[int, list]:
    """For each k, its draws: k training indices of each class, without replacement."""
    draws = {}
    for k in KS:
        draws[k] = []
        for d in range(DRAWS[k]):
            rng = np.random.default_rng([seed, k, d])
            picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c in classes]
            draws[k].append(np.concatenate(picked))
    return draws


def accuracy(centers: CenterSet, embeddings: np.ndarray, truth: np.ndarray, names10) -> float:
    """Nearest-center accuracy, classes matched by name (the sets order them differently)."""
    labels = centers.scores(embeddings)["labels"]
    to10 = np.array([names10.index(n) for n in centers.names])
    return float((to10[labels] == truth).mean())


def fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def summarise(bases: list[dict]) -> dict:
    """Means over the base models (each already a mean over draws), and the targets."""
    out = {}
    for k in KS:
        new = statistics.mean(statistics.mean(b["k"][k]["new4"]) for b in bases)
        old = statistics.mean(statistics.mean(b["k"][k]["old6"]) for b in bases)
        all10_new = statistics.mean(b["all10"]["new4"] for b in bases)
        before_old = statistics.mean(b["base_old6"] for b in bases)
        out[k] = {"new4": new, "old6": old, "new4_gap_points": 100 * (all10_new - new),
                  "old6_loss_points": 100 * (before_old - old)}  # fmt: skip
    t = out[TARGET_K]
    print(f"\nover {len(bases)} base model(s), k={TARGET_K}: enrolled classes "
          f"{t['new4_gap_points']:.1f} points below the all-10 model (target <= "
          f"{TARGET_NEW_POINTS:g}); old classes lose {t['old6_loss_points']:.1f} points "
          f"(target <= {TARGET_OLD_POINTS:g})")  # fmt: skip
    for k in KS:
        print(f"  k={k:3d}: new 4 {out[k]['new4']:.4f} (gap {out[k]['new4_gap_points']:+.1f}), "
              f"old 6 {out[k]['old6']:.4f} (loss {out[k]['old6_loss_points']:+.1f})")  # fmt: skip
    return out


# --------------------------------------------------------------------------- HTTP


def measure_http(model: Path, dataset, args) -> dict:
    """PUT latency with 20 images, and classify throughput with and without enrolments."""
    centers_file = Path(args.work) / "http.centers.npz"
    centers_file.unlink(missing_ok=True)
    env = {"CENTER_EMBED_ADMIN_KEYS": ADMIN, "CENTER_EMBED_CENTERS_FILE": str(centers_file)}
    with serve(model, env) as server:
        port = server.port
        enrolment = [png(image) for image in dataset.train.images[:20]]
        bodies = [multipart(png(image)) for image in dataset.test.images[:256]]
        asyncio.run(load(port, bodies[:8], 4, 1.0))  # warm the connections
        latencies = [put(port, f"class{i}", enrolment) for i in range(20)]
        p50 = float(np.percentile(latencies, 50))
        print(f"\nHTTP: PUT /v1/centers/{{name}} with 20 images, 20 times: p50 {p50:.1f} ms, "
              f"max {max(latencies):.1f} ms")  # fmt: skip
        ratios = []
        for r in range(args.rounds):
            quiet = asyncio.run(load(port, bodies, args.concurrency, args.seconds))
            busy, enrolled = under_enrolment(port, bodies, enrolment, args)
            rate_quiet = quiet["ok"] / quiet["seconds"]
            rate_busy = busy["ok"] / busy["seconds"]
            ratios.append(rate_busy / rate_quiet)
            print(f"  round {r + 1}: classify {rate_quiet:.1f} images/s alone, {rate_busy:.1f} "
                  f"while {enrolled} enrolments ran; ratio {ratios[-1]:.2f}")  # fmt: skip
    ratio = statistics.median(ratios)
    print(f"  median ratio {ratio:.2f} (target >= {TARGET_RATIO})")
    return {"put_p50_ms": p50, "put_ms": latencies, "throughput_ratios": ratios,
            "median_ratio": ratio}  # fmt: skip


def under_enrolment(port: int, bodies: list[bytes], enrolment: list[bytes], args):
    """The classify load while another thread enrols a class every --enrol-interval s."""
    stop, count = threading.Event(), [0]

    def enrol() -> None:
        while not stop.is_set():
            put(port, f"busy{count[0] % 4}", enrolment)
            count[0] += 1
            stop.wait(args.enrol_interval)

    thread = threading.Thread(target=enrol)
    thread.start()
    try:
        result = asyncio.run(load(port, bodies, args.concurrency, args.seconds))
    finally:
        stop.set()
        thread.join()
    return result, count[0]


def put(port: int, name: str, images: list[bytes]) -> float:
    """One PUT /v1/centers/{name}: its latency in ms (an error stops the benchmark)."""
    import httpx

    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    started = time.perf_counter()
    response = httpx.put(f"http://127.0.0.1:{port}/v1/centers/{name}", files=files,
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)  # fmt: skip
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise SystemExit(f"PUT failed: {response.status_code} {response.text[:500]}")
    return elapsed


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
