"""bench_gpu.py's stages: the torch side, imported once the arguments are read (so that
`bench_gpu.py --help` and `--summary` need no torch). Each stage is a function
`stage_<name>(bench) -> dict` that bench_gpu.main runs in turn."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import linecache
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import git_commit, results_path, write_results
from gpu_report import summarize

import center_embed
from center_embed.data import load_dataset
from center_embed.training.center_loss import CenterLoss
from center_embed.training.checkpoint import Checkpoint, build_model, load_checkpoint
from center_embed.training.config import PRESETS, load_config
from center_embed.training.inference import split_metrics, use_bf16
from center_embed.training.loader import BatchLoader
from center_embed.training.model import EmbeddingNet

TIMING = ["train.eval_every=1000", "train.progress=false"]
# --tiny: seconds on a CPU, same code paths.
TINY = {
    "gpu": [
        "model.widths=8,16,16",
        "model.embedding_dim=16",
        "train.batch_size=64",
        "train.epochs=2",
        "data.val_size=60",
    ],
    "gpu-wide": [
        "model.widths=16,24,24",
        "model.embedding_dim=16",
        "train.batch_size=64",
        "train.epochs=2",
        "data.val_size=60",
    ],
}
INFERENCE_BATCHES = (1, 64, 1024)


class Stopped(BaseException):
    """SIGTERM/SIGINT (e.g. from `timeout`): stop, keeping what was measured."""


# --------------------------------------------------------------------------- context


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.started = time.monotonic()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = args.cache or os.environ.get("CENTER_EMBED_CACHE") or str(self.work / "cache")
        self.data = args.data
        self.dataset = None
        self.keep: dict[str, Path] = {}  # checkpoints kept for later stages
        self.epoch_seconds: dict[str, float] = {}  # measured loop seconds per epoch
        self.out = results_path("gpu", args.json)  # one file, even past midnight
        self.results: dict[str, Any] = {
            "python": sys.executable,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "environment": environment(self.device),
            "stages": {},
        }

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def write(self) -> None:
        write_results("gpu", self.results, self.out)

    def overrides(self, preset: str, seed: int, extra: list[str]) -> list[str]:
        sets = [
            f"data.path={self.data}",
            f"data.cache_dir={self.cache}",
            f"train.device={self.args.device}",
            f"train.seed={seed}",
        ]
        if self.args.tiny:
            sets += TINY.get(preset, TINY["gpu"])
        return sets + extra


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "git_commit": git_commit(),
        "package": str(Path(center_embed.__file__).parent),
        "source_sha256": source_digest(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    else:
        env["gpu"] = None
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    return env


def source_digest() -> str:
    """sha256 of the imported package's .py files: which code ran, even without git."""
    h = hashlib.sha256()
    root = Path(center_embed.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def run_stage(bench: Bench, name: str, fn: Callable[[Bench], Any]) -> bool:
    """Run one stage; record its result or its error; write the JSON. False: stop all."""
    print(f"\n=== stage {name} ({bench.left():.0f} s of budget left)", flush=True)
    record: dict[str, Any] = {"status": "running"}
    bench.results["stages"][name] = record
    start = time.monotonic()
    go_on = True
    try:
        record["result"] = fn(bench)
        record["status"] = "ok"
    except Stopped:
        record["status"] = "stopped by a signal"
        go_on = False
    except Exception as e:  # one stage failing must not lose the others
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()[-4000:]
        print(record["traceback"], file=sys.stderr, flush=True)
        if type(e).__name__ == "TrainingInterrupted":  # train() turned our signal into this
            go_on = False
    record["seconds"] = round(time.monotonic() - start, 2)
    bench.write()
    print(f"=== stage {name}: {record['status']} in {record['seconds']} s", flush=True)
    return go_on


# --------------------------------------------------------------------------- training runs


@contextlib.contextmanager
def first_batch_clock(bench: Bench, marks: dict[str, float]):
    """Record when the first training batch is handed out (device synchronised), by
    wrapping BatchLoader.epoch."""
    real = BatchLoader.epoch

    def epoch(self, *args, **kwargs):
        for i, batch in enumerate(real(self, *args, **kwargs)):
            if i == 0 and "first_batch" not in marks:
                bench.sync()
                marks["first_batch"] = time.perf_counter()
            yield batch

    BatchLoader.epoch = epoch
    try:
        yield
    finally:
        BatchLoader.epoch = real


def train_run(
    bench: Bench,
    preset: str,
    seed: int,
    extra: list[str] | None = None,
    label: str = "",
    keep: str = "",
    timing: bool = True,
    estimates: bool = True,
) -> dict[str, Any]:
    """Train one run in this process and measure it; test accuracy from its best.pt."""
    from center_embed.training.train import train

    sets = bench.overrides(preset, seed, (TIMING if timing else []) + (extra or []))
    cfg = load_config(preset, None, sets)
    out = Path(tempfile.mkdtemp(dir=bench.work, prefix=f"{preset}-s{seed}-"))
    label = label or f"{preset} seed {seed}"
    marks: dict[str, float] = {}
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    bench.sync()
    start = time.perf_counter()
    with first_batch_clock(bench, marks):
        result = train(cfg, out, log=lambda line: print(f"  [{label}] {line}", flush=True))
    bench.sync()
    record = {"label": label, "preset": preset, "seed": seed}
    record.update(run_record(cfg, sets, result, start, marks.get("first_batch")))
    if bench.cuda:
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(bench.device) / 2**30, 2)
    record.update(test_metrics(bench, out / "best.pt"))
    if keep:
        bench.keep[keep] = out / "best.pt"
    else:
        shutil.rmtree(out, ignore_errors=True)
    seconds = record["loop_seconds"] or record["train_seconds"]
    if estimates:  # the time budget's estimates come from runs like the timed ones
        bench.epoch_seconds[preset] = seconds / cfg.train.epochs
    print(
        f"  [{label}] loop {seconds:.2f} s, wall {record['wall_seconds']:.2f} s, "
        f"{record['images_per_second']:.0f} img/s, nearest-center "
        f"{record['test']['nearest_center_accuracy']:.4f} / TTA "
        f"{record['test_tta']['nearest_center_accuracy']:.4f}",
        flush=True,
    )
    return record


def run_record(
    cfg, sets: list[str], result: dict[str, Any], start: float, first_batch: float | None
) -> dict[str, Any]:
    """The figures of one train() that began at `start` (perf_counter, device synchronised)
    and handed out its first batch at `first_batch` (None: not observed)."""
    wall = time.perf_counter() - start
    last = result["history"][-1]
    steps = int(last["step"])
    loop = None if first_batch is None else start + last["elapsed_seconds"] - first_batch
    return {
        "overrides": [s for s in sets if not s.startswith(("data.path", "data.cache_dir"))],
        "epochs": cfg.train.epochs,
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "center_weight": cfg.loss.center_weight,
        "wall_seconds": round(wall, 3),
        "train_seconds": round(last["elapsed_seconds"], 3),  # train()'s own clock
        "loop_seconds": None if loop is None else round(loop, 3),
        "setup_seconds": None if loop is None else round(first_batch - start, 3),
        "images_per_second": round(
            steps * cfg.train.batch_size / (loop or last["elapsed_seconds"]), 1
        ),
        "last_epoch_images_per_second": round(last["images_per_second"], 1),
        "train_ce": last["train_ce"],
        "train_center": last["train_center"],
        "val": result.get("val", {}),
    }


def test_metrics(bench: Bench, checkpoint: Path) -> dict[str, Any]:
    ckpt = Checkpoint.load(checkpoint)
    model, criterion = ckpt.build_model()
    cfg = ckpt.config
    model.to(bench.device)
    if cfg.train.channels_last != "off":
        model = model.to(memory_format=torch.channels_last)
    bf16 = use_bf16(cfg.train.bf16, bench.device)
    test = bench.dataset.test if bench.dataset is not None else load_run_test(bench, cfg)
    out = {}
    for key, tta in (("test", 0), ("test_tta", 2)):
        metrics, _ = split_metrics(
            model, criterion.centers, test, ckpt.preprocess, bench.device, bf16, tta
        )
        out[key] = {k: round(v, 5) for k, v in metrics.items()}
    return out


def load_run_test(bench: Bench, cfg):
    return load_dataset(cfg.data.path, cfg.data.image_size, cfg.data.cache_dir).test


def estimate(bench: Bench, preset: str, epochs: float) -> float:
    """Seconds one run should take, from what was measured so far (generous)."""
    per_epoch = bench.epoch_seconds.get(preset)
    if per_epoch is None:
        base = bench.epoch_seconds.get("gpu", 0.5)
        per_epoch = base * (2.6 if preset == "gpu-wide" else 1.0)
    return 1.3 * per_epoch * epochs + 8.0  # + setup, evaluation with TTA, checkpoints


def preset_epochs(bench: Bench, preset: str) -> float:
    if bench.args.tiny:
        return 2.0
    return float(PRESETS[preset]["train"]["epochs"])


# --------------------------------------------------------------------------- stages


def stage_data(bench: Bench) -> dict[str, Any]:
    if bench.args.tiny:
        bench.data = str(tiny_subset(Path(bench.args.data), bench.work / "tiny-data"))
    start = time.perf_counter()
    dataset = load_dataset(bench.data, 32, bench.cache)
    seconds = time.perf_counter() - start
    bench.dataset = dataset
    return {
        "path": bench.data,
        "train_images": len(dataset.train),
        "test_images": len(dataset.test),
        "classes": dataset.class_names,
        "load_seconds": round(seconds, 2),
        "note": "decode + cache write on a cold cache; a memory map when cached",
    }


def tiny_subset(source: Path, target: Path, train: int = 40, test: int = 12) -> Path:
    """A few images per class of an image-folder dataset, copied (for --tiny)."""
    if target.exists():
        return target
    for split, n in (("train", train), ("test", test)):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            dest = target / split / folder.name
            dest.mkdir(parents=True)
            for f in sorted(folder.iterdir())[:n]:
                shutil.copyfile(f, dest / f.name)
    return target


def stage_warmup(bench: Bench) -> dict[str, Any]:
    run = train_run(
        bench, "gpu", 999, ["train.epochs=1"], label="warm-up (1 epoch)", estimates=False
    )
    return {"run": run, "note": "excluded from every statistic"}


def stage_gpu(bench: Bench) -> dict[str, Any]:
    runs: dict[str, Any] = {"lambda": [], "lambda0": []}
    for i in range(bench.args.seeds):
        cost = estimate(bench, "gpu", preset_epochs(bench, "gpu"))
        order = ["lambda", "lambda0"] if i % 2 == 0 else ["lambda0", "lambda"]
        # The first pair always runs (the estimate is a guess until then); later pairs
        # only while time is left for the stages after this one.
        if not bench.fits(2 * cost + 60 if i else 30):
            runs["stopped_early"] = f"after {i} seeds: budget"
            break
        for kind in order:
            extra = ["loss.center_weight=0"] if kind == "lambda0" else []
            label = f"gpu {'λ=0' if kind == 'lambda0' else 'λ'} seed {i}"
            keep = "gpu" if (i == 0 and kind == "lambda") else ""
            runs[kind].append(train_run(bench, "gpu", i, extra, label=label, keep=keep))
    summary = {k: summarize(v) for k, v in runs.items() if isinstance(v, list) and v}
    if runs["lambda"] and runs["lambda0"]:
        a, b = summary["lambda"]["loop_seconds"], summary["lambda0"]["loop_seconds"]
        summary["time_ratio_lambda_over_lambda0"] = round(a["mean"] / b["mean"], 4)
    return {"runs": runs, "summary": summary}


def stage_wide(bench: Bench) -> dict[str, Any]:
    runs = []
    for i in range(bench.args.wide_seeds):
        cost = estimate(bench, "gpu-wide", preset_epochs(bench, "gpu-wide"))
        if not bench.fits(cost + 30):
            break
        runs.append(train_run(bench, "gpu-wide", i, label=f"gpu-wide seed {i}"))
    return {"runs": runs, "summary": summarize(runs) if runs else {}}


def stage_extra(bench: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plans = [("epochs12", ["train.epochs=12"]), ("epochs20", ["train.epochs=20"])]
    if bench.args.tiny:
        plans = [("epochs1", ["train.epochs=1"]), ("epochs3", ["train.epochs=3"])]
    for key, extra in plans:
        epochs = float(extra[0].split("=")[1])
        if not bench.fits(estimate(bench, "gpu", epochs) + 20):
            out[key] = "skipped: budget"
            continue
        out[key] = train_run(bench, "gpu", 0, extra, label=f"gpu {key} seed 0")
    if bench.fits(estimate(bench, "gpu", preset_epochs(bench, "gpu")) + 20):
        out["as_users_run_it"] = train_run(
            bench, "gpu", 0, ["train.progress=false"], label="gpu as users run it", timing=False
        )
    return out


def stage_inference(bench: Bench) -> dict[str, Any]:
    path = bench.keep.get("gpu")
    if path is not None:
        ckpt = load_checkpoint(path)
        model, criterion, cfg = build_model(ckpt)
        centers, preprocess = criterion.centers, ckpt["preprocess"]
    else:  # no trained model: speed does not depend on the weights
        cfg = load_config("gpu", None, TINY["gpu"] if bench.args.tiny else [])
        model = EmbeddingNet(cfg.model, 10).eval()
        centers = torch.randn(10, cfg.model.embedding_dim)
        preprocess = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [32, 32]}
    model = model.to(bench.device).to(memory_format=torch.channels_last).eval()
    centers = centers.float().to(bench.device)
    mean = torch.tensor(preprocess["mean"], device=bench.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess["std"], device=bench.device).view(1, 3, 1, 1) * 255
    c2 = centers.pow(2).sum(1)[None, :]

    def pipeline(images: torch.Tensor, bf16: bool):
        x = (images.permute(0, 3, 1, 2).float() - mean) / std  # channels_last in memory
        with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bf16):
            e = model.embed(x).float()
        d = (e.pow(2).sum(1, keepdim=True) - 2 * e @ centers.T + c2).clamp_min(0)
        return e, d.argmin(1), d.amin(1)

    results: dict[str, Any] = {"model": str(path or "untrained"), "input": "uint8 on device"}
    batches = INFERENCE_BATCHES if not bench.args.tiny else (1, 64)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for bf16 in (False, True):
            for batch in batches:
                images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=g)
                images = images.to(bench.device)
                timing = time_calls(bench, lambda im=images, b=bf16: pipeline(im, b))
                key = f"{'bf16' if bf16 else 'fp32'}@{batch}"
                results[key] = {
                    "images_per_second": round(batch / timing["mean_seconds"], 1),
                    "p50_ms": round(1000 * timing["p50_seconds"], 4),
                    "p90_ms": round(1000 * timing["p90_seconds"], 4),
                    "calls": timing["calls"],
                }
                print(f"  torch {key}: {results[key]}", flush=True)
        # Agreement of bf16 with fp32 on real test images (labels and distances).
        if bench.dataset is not None:
            real = torch.from_numpy(np.array(bench.dataset.test.images[:1024])).to(bench.device)
            e32, l32, m32 = pipeline(real, False)
            e16, l16, m16 = pipeline(real, True)
            results["bf16_vs_fp32"] = {
                "label_agreement": float((l16 == l32).float().mean()),
                "max_relative_embedding_error": float(
                    ((e16 - e32).norm(dim=1) / e32.norm(dim=1).clamp_min(1e-12)).max()
                ),
            }
    results["onnxruntime"] = onnxruntime_speed(bench, path)
    return results


def time_calls(bench: Bench, fn: Callable[[], Any], seconds: float = 0.6) -> dict[str, Any]:
    """Per-call latencies (CUDA events on a GPU) after a warm-up, for about `seconds`."""
    for _ in range(3):
        fn()
    bench.sync()
    start = time.perf_counter()
    fn()
    bench.sync()
    one = max(time.perf_counter() - start, 1e-6)
    calls = int(min(2000, max(10, seconds / one)))
    if bench.args.tiny:
        calls = min(calls, 20)
    latencies = []
    if bench.cuda:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(calls)
        ]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(bench.device)
        latencies = [begin.elapsed_time(end) / 1000 for begin, end in events]
        # Throughput: back-to-back calls, no per-call wait.
        first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        first.record()
        for _ in range(calls):
            fn()
        last.record()
        torch.cuda.synchronize(bench.device)
        mean = first.elapsed_time(last) / 1000 / calls
    else:
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            latencies.append(time.perf_counter() - t)
        mean = statistics.fmean(latencies)
    latencies.sort()
    return {
        "calls": calls,
        "mean_seconds": mean,
        "p50_seconds": latencies[len(latencies) // 2],
        "p90_seconds": latencies[int(len(latencies) * 0.9)],
    }


def onnxruntime_speed(bench: Bench, checkpoint: Path | None) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif bench.args.tiny:  # exercise the code path on a CPU smoke run
        chosen = ["CPUExecutionProvider"]
    else:
        message = f"CUDAExecutionProvider absent (providers: {providers}); skipped"
        print(f"  onnxruntime: {message}", flush=True)
        return {"skipped": message}
    if checkpoint is None:
        return {"skipped": "no trained checkpoint to export"}
    import onnx

    from center_embed.export import onnx_export

    ckpt = Checkpoint.load(checkpoint)
    model, criterion = ckpt.build_model()
    # The backbone and distances, without the atypicality (its fit needs the training set)
    graph = onnx_export.Graph(model, criterion.centers, onnx_export.DEFAULT_UNKNOWN_SCORE)
    proto = onnx_export.to_onnx(graph, ckpt.preprocess)
    path = bench.work / "model.onnx"
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=chosen)
    name = session.get_inputs()[0].name
    results: dict[str, Any] = {"providers": session.get_providers(), "input": "numpy uint8"}
    rng = np.random.default_rng(0)
    for batch in (1, 64, 1024) if not bench.args.tiny else (1, 64):
        images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        timing = time_host(lambda im=images: session.run(None, {name: im}), bench.args.tiny)
        results[f"fp32@{batch}"] = {
            "images_per_second": round(batch / timing["mean_seconds"], 1),
            "p50_ms": round(1000 * timing["p50_seconds"], 4),
            "calls": timing["calls"],
        }
        print(f"  onnxruntime fp32@{batch}: {results[f'fp32@{batch}']}", flush=True)
    return results


def time_host(fn: Callable[[], Any], tiny: bool, seconds: float = 0.6) -> dict[str, Any]:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-6)
    calls = int(min(2000, max(10, seconds / one)))
    calls = min(calls, 20) if tiny else calls
    latencies = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    latencies.sort()
    return {
        "calls": calls,
        "mean_seconds": statistics.fmean(latencies),
        "p50_seconds": latencies[len(latencies) // 2],
    }


def stage_centerloss(bench: Bench) -> dict[str, Any]:
    results: dict[str, Any] = {}
    batch, dim = (1024, 128) if not bench.args.tiny else (256, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    for classes in (10, 1024, 4096, 100_000):
        x = torch.randn(batch, dim, generator=g).to(bench.device)
        y = torch.randint(0, classes, (batch,), generator=g).to(bench.device)
        for path in ("dense", "sparse"):
            for update in ("paper", "mean"):
                criterion = CenterLoss(classes, dim, update, path=path).to(bench.device).train()
                timing = time_calls(bench, lambda c=criterion, x=x, y=y: c(x, y), seconds=0.2)
                key = f"C={classes} {path} {update}"
                results[key] = {"ms": round(1000 * timing["p50_seconds"], 4)}
        line = ", ".join(
            f"{k.split(' ', 1)[1]} {v['ms']:.3f}"
            for k, v in results.items()
            if k.startswith(f"C={classes} ")
        )
        print(f"  C={classes}: {line} ms", flush=True)
    results["note"] = f"B={batch}, D={dim}: forward and center update, p50 per call"
    return results


def stage_syncaudit(bench: Bench) -> dict[str, Any]:
    if not bench.cuda:
        return {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
    from center_embed.training.train import train

    sets = bench.overrides("gpu", 0, TIMING + ["train.epochs=1"])
    cfg = load_config("gpu", None, sets)
    out = Path(tempfile.mkdtemp(dir=bench.work, prefix="syncaudit-"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(cfg, out, log=lambda _: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    shutil.rmtree(out, ignore_errors=True)
    steps = int(result["history"][-1]["step"])
    where = Counter()
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            where[(w.filename, w.lineno, str(w.message).splitlines()[0][:80])] += 1
    rows = []
    for (filename, lineno, message), count in where.most_common(20):
        code = linecache.getline(filename, lineno).strip()
        rows.append(
            {
                "where": f"{short_path(filename)}:{lineno}",
                "count": count,
                "per_step": round(count / steps, 2),
                "code": code,
                "message": message,
            }
        )
        print(f"  {count:5d} ({count / steps:.2f}/step)  {short_path(filename)}:{lineno}  {code}")
    return {
        "steps": steps,
        "syncs": sum(where.values()),
        "locations": rows,
        "note": "one epoch, validation included; per_step ~1 or more marks a per-step sync",
    }


def short_path(filename: str) -> str:
    return str(Path(*Path(filename).parts[-3:]))


def stage_cudnn(bench: Bench) -> dict[str, Any]:
    cost = estimate(bench, "gpu", preset_epochs(bench, "gpu"))
    if not bench.cuda:
        return {"skipped": "needs CUDA"}
    if not bench.fits(2 * cost + 10):
        return {"skipped": "budget"}
    torch.backends.cudnn.benchmark = True
    try:
        first = train_run(bench, "gpu", 0, label="cudnn.benchmark run 1 (autotunes)")
        second = train_run(bench, "gpu", 1, label="cudnn.benchmark run 2")
    finally:
        torch.backends.cudnn.benchmark = False
    return {"first": first, "second": second}


def stage_compile(bench: Bench) -> dict[str, Any]:
    """train.compile=true as train.training_forward does it (CUDA only; inductor's
    emulate_precision_casts on): a first run that compiles, then one on the warm caches."""
    if not bench.cuda:
        return {"skipped": "train.compile compiles on CUDA only"}
    import torch._dynamo

    cost = estimate(bench, "gpu", preset_epochs(bench, "gpu"))
    if not bench.fits(2 * cost + 90):
        return {"skipped": "budget"}
    torch._dynamo.reset()
    extra = ["train.compile=true"]
    first = train_run(bench, "gpu", 0, extra, label="compiled run 1 (compiles)")
    second = train_run(bench, "gpu", 1, extra, label="compiled run 2")
    return {"first": first, "second": second}
