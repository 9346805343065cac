"""Runtimes, precisions and JPEG decoders side by side, and `score` old against new (issue 13).

    CENTER_EMBED_CACHE=/tmp/cecache .venv/bin/python benchmarks/bench_runtime.py \
        --model rt.onnx --int8-model rt-int8.onnx --data ../shared/data/cifar10

Three parts, each printing both sides of its ratios from this one run:

1. in-process throughput, batch 64, --threads 2, on real CIFAR-10 test images already
   decoded: onnxruntime fp32, onnxruntime on the --int8 export, OpenVINO fp32 and bf16 on
   the same fp32 .onnx file, and what `--runtime auto` picks. Rounds alternate between
   them so a load that comes and goes weighs on each alike; the median round counts.
   Target: auto within 0.9x of the fastest.
2. JPEG decoding (decode_image's work: bytes -> uint8 32x32 RGB), per image on one thread
   and with 2 threads (the GIL): Pillow, simplejpeg, PyTurboJPEG where installed, on the
   CIFAR JPEGs and on larger JPEGs (CIFAR images upscaled to 512x384 with noise, q=90).
3. `score` on the 10,000 test JPEGs to Parquet: old (onnxruntime fp32, Pillow: today's
   defaults) against new (--runtime auto --precision auto, simplejpeg), with the share of
   identical labels. Target: 3x the images/s with >= 99% identical labels.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import ROOT, add_json_argument, write_results

from center_embed import imageio
from center_embed.data import load_dataset
from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.runtime_bench import time_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the fp32 .onnx file")
    p.add_argument("--int8-model", help="the same checkpoint exported with --int8")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0, help="per config per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="runtimes,decoders,score")
    add_json_argument(p)
    return p.parse_args()


# --------------------------------------------------------------------------- 1. runtimes


def runtimes_part(args: argparse.Namespace) -> dict:
    images = np.ascontiguousarray(load_dataset(args.data).test.images[: args.batch_size])
    configs = {
        "onnxruntime fp32": (args.model, "onnxruntime", "auto"),
        "openvino fp32": (args.model, "openvino", "fp32"),
        "openvino bf16": (args.model, "openvino", "bf16"),
        "auto": (args.model, "auto", "auto"),
    }
    if args.int8_model:
        configs["onnxruntime int8"] = (args.int8_model, "onnxruntime", "auto")
        configs["openvino int8"] = (args.int8_model, "openvino", "auto")
    models = {
        name: OnnxModel(
            path, RuntimeOptions(device="cpu", threads=args.threads, runtime=rt, precision=pr)
        )
        for name, (path, rt, pr) in configs.items()
    }
    print(f"\n1. in-process, batch {len(images)}, {args.threads} threads, images/s "
          f"(median of {args.rounds} alternating rounds of {args.seconds:g} s)")  # fmt: skip
    print(f"   auto picked: {models['auto'].runtime}")
    speeds: dict[str, list[float]] = {name: [] for name in models}
    cpu_ms: dict[str, list[float]] = {name: [] for name in models}  # robust to others' load
    for _ in range(args.rounds):
        for name, model in models.items():
            cpu = time.process_time()
            speed, runs = time_model(model.run, images, args.seconds)
            speeds[name].append(speed)
            cpu_ms[name].append(1000 * (time.process_time() - cpu) / ((runs + 1) * len(images)))
    median = {name: statistics.median(v) for name, v in speeds.items()}
    fastest = max(median, key=median.get)
    base = median["onnxruntime fp32"]
    for name, value in median.items():
        rounds = ", ".join(f"{v:.0f}" for v in speeds[name])
        cpu = statistics.median(cpu_ms[name])
        print(f"   {name:<18} {value:8.0f}  {value / base:5.2f}x onnxruntime fp32  "
              f"{value / median[fastest]:5.2f}x fastest  {cpu:5.2f} CPU ms/img "
              f"(rounds: {rounds})")  # fmt: skip
    ratio = median["auto"] / median[fastest]
    print(f"   auto / fastest ({fastest}) = {ratio:.2f} (target >= 0.9)")
    return {"batch": len(images), "threads": args.threads, "auto_picked": models["auto"].runtime,
            "images_per_second": speeds, "cpu_ms_per_image": cpu_ms, "fastest": fastest,
            "auto_over_fastest": ratio, "target": 0.9}  # fmt: skip


# --------------------------------------------------------------------------- 2. decoders


def decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    """name -> bytes to uint8 (32, 32, 3), each as decode_image would use it."""
    from PIL import Image

    found: dict[str, Callable[[bytes], np.ndarray]] = {}

    def pillow(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return imageio.fit_image(image, 32)

    found["Pillow"] = pillow
    if imageio.simplejpeg is not None:
        found["simplejpeg"] = lambda data: imageio.decode_jpeg_fast(data, 32, None)
    try:
        import turbojpeg

        jpeg = turbojpeg.TurboJPEG()

        def turbo(data: bytes) -> np.ndarray:
            pixels = jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB)
            if pixels.shape[:2] == (32, 32):
                return pixels
            return imageio.fit_image(Image.fromarray(pixels), 32)

        found["PyTurboJPEG"] = turbo
    except Exception as e:  # no wheel, or no system libjpeg-turbo it accepts
        print(f"   PyTurboJPEG not measured: {str(e).splitlines()[0]}")
    return found


def larger_jpegs(small: list[bytes], n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for data in small[:n]:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((512, 384), Image.BICUBIC)
        noisy = np.asarray(image, np.int16) + rng.integers(-12, 12, (384, 512, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_speed(decode: Callable, files: list[bytes], threads: int) -> float:
    """images/s of `decode` over `files` with `threads` threads (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        if threads == 1:
            for data in files:
                decode(data)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(decode, files, chunksize=64))
        best = min(best, time.perf_counter() - start)
    return len(files) / best


def decoders_part(args: argparse.Namespace) -> dict:
    files = sorted(Path(args.data, "test").rglob("*.jpg"))[:3000]
    small = [f.read_bytes() for f in files]
    print("\n2. JPEG decoding to uint8 32x32, images/s (best of 3)")
    found = decoders()
    results: dict[str, dict] = {}
    for label, data in (("CIFAR 32x32", small), ("512x384", larger_jpegs(small, 200))):
        reference = [found["Pillow"](d) for d in data[:200]]
        speeds = {name: [decode_speed(decode, data, t) for t in (1, args.threads)]
                  for name, decode in found.items()}  # fmt: skip
        base = speeds["Pillow"]
        for name, (one, many) in speeds.items():
            decode = found[name]
            same = all(np.array_equal(decode(d), r) for d, r in zip(data, reference, strict=False))
            print(f"   {label:<12} {name:<12} 1 thread {one:7.0f} ({one / base[0]:4.2f}x Pillow)"
                  f"  {args.threads} threads {many:7.0f} ({many / base[1]:4.2f}x)  "
                  f"{many / one:4.2f}x from threads  pixels = Pillow's: {same}")  # fmt: skip
            results.setdefault(label, {})[name] = {"one_thread": one, "threads": many,
                                                   "pixels_equal_pillow": same}  # fmt: skip
    return results


# --------------------------------------------------------------------------- 3. score


def score_once(model: str, folder: Path, out: Path, new: bool) -> tuple[float, float, dict]:
    """(images/s, CPU ms per image of this process, {id: label}) of one `score` run."""
    from center_embed.score.local import score

    saved = imageio.simplejpeg
    if not new:
        imageio.simplejpeg = None  # today's decoding: Pillow for everything
    try:
        runtime = ("auto", "auto") if new else ("onnxruntime", "auto")
        cpu = time.process_time()
        options = RuntimeOptions(runtime=runtime[0], precision=runtime[1])
        summary = score(model, folder, out, progress=False, overwrite=True, options=options)
        cpu_ms = 1000 * (time.process_time() - cpu) / max(summary.scored, 1)
    finally:
        imageio.simplejpeg = saved
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["id", "label"])
    ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
    return summary.images_per_second, cpu_ms, dict(zip(ids, labels, strict=True))


def score_part(args: argparse.Namespace) -> dict:
    folder = Path(args.data, "test")
    print(f"\n3. score {folder} to Parquet (default batch, workers and threads), images/s")
    old_speeds, new_speeds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(max(1, args.rounds - 1)):
            old, old_cpu, old_labels = score_once(args.model, folder, Path(tmp, "o.parquet"), False)
            new, new_cpu, new_labels = score_once(args.model, folder, Path(tmp, "n.parquet"), True)
            old_speeds.append(old)
            new_speeds.append(new)
            print(f"   round {r + 1}: old (onnxruntime fp32, Pillow) {old:7.0f} ({old_cpu:.2f} CPU "
                  f"ms/img)   new (auto, simplejpeg) {new:7.0f} ({new_cpu:.2f} CPU ms/img)   "
                  f"ratio {new / old:4.2f}, CPU {old_cpu / new_cpu:4.2f}")  # fmt: skip
    same = np.mean([new_labels[k] == v for k, v in old_labels.items()])
    ratio = statistics.median(new_speeds) / statistics.median(old_speeds)
    print(f"   median ratio new/old = {ratio:.2f} (target >= 3); identical labels "
          f"{same:.4f} of {len(old_labels)} (target >= 0.99)")  # fmt: skip
    return {"old_images_per_second": old_speeds, "new_images_per_second": new_speeds,
            "median_ratio": ratio, "identical_labels": same, "images": len(old_labels),
            "targets": {"median_ratio": 3, "identical_labels": 0.99}}  # fmt: skip


def main() -> None:
    args = parse_args()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    parts = {"runtimes": runtimes_part, "decoders": decoders_part, "score": score_part}
    results = {name: parts[name](args) for name in args.parts.split(",")}
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    write_results("runtime", results, args.json)


if __name__ == "__main__":
    main()
