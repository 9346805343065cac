"""How fast each installed runtime × precision runs a model here: `center-embed bench`.

The same .onnx file is opened by every runtime installed, at every precision that runtime
can give it on this CPU (choose_runtime decides what is possible), and each is timed on
random uint8 batches (speed does not depend on the pixels) for a fixed wall time per
batch size. Torch-free: it uses center_embed.runtime only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from center_embed.errors import UserError
from center_embed.runtime import OnnxModel, RuntimeOptions, choose_runtime, installed_runtimes

BENCH_SEED = 0


@dataclass(frozen=True)
class BenchRow:
    runtime: str
    precision: str
    batch_size: int
    images_per_second: float
    runs: int


def runtime_options(file_precision: str) -> list[tuple[str, str]]:
    """(runtime, precision) pairs that can run a file of this precision here."""
    options = []
    for runtime in installed_runtimes():
        for precision in dict.fromkeys([file_precision, "bf16"]):
            try:
                choice = choose_runtime(runtime, precision, file_precision=file_precision,
                                        device="cpu")  # fmt: skip
            except UserError:
                continue
            options.append((choice.runtime, choice.precision))
    return options


def time_model(
    run: Callable[[np.ndarray], object], images: np.ndarray, seconds: float
) -> tuple[float, int]:
    """(images/s, runs) of `run` on `images`, after one warm-up run, for about `seconds`."""
    run(images)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        run(images)
        runs += 1
    return runs * len(images) / elapsed, runs


def bench(
    path: str | Path,
    batch_sizes: tuple[int, ...] = (1, 16, 64),
    threads: int = 0,
    seconds: float = 2.0,
    log: Callable[[BenchRow], None] = lambda row: None,
) -> list[BenchRow]:
    """Time every runtime × precision × batch size on `path`; `log` sees each row as it comes."""
    if not batch_sizes or min(batch_sizes) < 1 or seconds <= 0:
        raise UserError("batch sizes must be positive and the time per measurement above 0")
    probe = OnnxModel(path, RuntimeOptions(device="cpu", threads=1))
    h, w = probe.info.input_size
    rng = np.random.default_rng(BENCH_SEED)
    images = rng.integers(0, 256, (max(batch_sizes), h, w, 3), dtype=np.uint8)
    rows = []
    for runtime, precision in runtime_options(probe.info.precision):
        model = OnnxModel(
            path,
            RuntimeOptions(device="cpu", threads=threads, runtime=runtime, precision=precision),
        )
        for batch in batch_sizes:
            speed, runs = time_model(model.run, images[:batch], seconds)
            rows.append(BenchRow(runtime, precision, batch, speed, runs))
            log(rows[-1])
    return rows
