"""Plain helpers shared by the tests: tiny data built on the spot, the package's layout,
a live uvicorn server in a thread, and image bytes of every kind (good, corrupt, bombs).

Fixtures live in the conftest.py files; everything here is an ordinary function, imported
as `from tests.helpers import ...` (the one import between test files).
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import pickle
import socket
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repository: tests/ lies directly in it
TINY_CLASSES = ["red", "green", "blue"]
API_KEY = "test-key-0123456789"


# --------------------------------------------------------------------------- tiny data


def make_tiny_images(n: int, label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8 images: class `label` is bright in channel `label`."""
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    images[..., label] += rng.integers(120, 165, (n, 1, 1), dtype=np.uint8)
    # A class-specific stripe pattern as a second cue.
    images[:, :: label + 2, :, :] //= 2
    return images


def write_image_folder(
    root: Path, per_class: dict[str, int], classes: list[str] = TINY_CLASSES, seed: int = 0
) -> Path:
    """root/{train,test}/<class>/NNNN.png with per_class[split] images each."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(make_tiny_images(n, label, rng)):
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def tiny_config(data: Path, **overrides: str):
    """The `tiny` preset on `data`, 3 epochs; overrides as section__key="value"."""
    from center_embed.training.config import load_config

    sets = [f"data.path={data}", "data.val_size=48", "train.epochs=3", "train.batch_size=32"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config("tiny", None, sets)


def cifar_batch(n: int, seed: int, num_classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, num_classes, n)],
        b"batch_label": b"test",
    }


def write_cifar(root: Path, as_archive: bool, per_batch: int = 6) -> tuple[Path, dict]:
    """A small CIFAR-10 python archive (or extracted folder) in the canonical format."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(per_batch, seed) for seed, name in enumerate(names)}
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    blobs = {name: pickle.dumps(b) for name, b in batches.items()}
    blobs["batches.meta"] = pickle.dumps(meta)
    if not as_archive:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name, blob in blobs.items():
            (folder / name).write_bytes(blob)
        return root, batches
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, batches


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- references
# Brute-force definitions by Python loops: what the vectorised metrics are checked against.


def brute_force_retrieval(x: list[list[float]], y: list[int]) -> tuple[float, float]:
    """Leave-one-out precision@1 and MAP@R by sorting every other point by distance."""
    p1, aps, n = 0.0, 0.0, 0
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        others = [(math.dist(xi, xj), y[j]) for j, xj in enumerate(x) if j != i]
        others.sort(key=lambda t: t[0])
        r = sum(1 for _, yj in others if yj == yi)
        if r == 0:
            continue
        n += 1
        p1 += others[0][1] == yi
        hits, ap = 0, 0.0
        for k, (_, yj) in enumerate(others[:r], start=1):
            if yj == yi:
                hits += 1
                ap += hits / k
        aps += ap / r
    return p1 / n, aps / n


def brute_force_intra_inter(x: list[list[float]], y: list[int], c: list[list[float]]) -> float:
    """Mean distance to the own center over the mean distance between the present centers."""
    intra = sum(math.dist(xi, c[yi]) for xi, yi in zip(x, y, strict=True)) / len(x)
    present = sorted(set(y))
    pairs = [math.dist(c[a], c[b]) for a in present for b in present if a != b]
    return intra / (sum(pairs) / len(pairs))


# --------------------------------------------------------------------------- package layout
# Tests that must cover every module (the dependency rules, the wheel) walk the tree with
# these functions, so a new module is covered without editing a list.


def package_dirs() -> dict[str, Path]:
    """Import name -> source folder, as pyproject.toml's [tool.setuptools.package-dir] maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def source_modules() -> dict[str, Path]:
    """Every module the wheel installs: dotted name -> source file (packages by __init__.py).

    Walks without following symlinks: a worktree's center_embed/export link is the export/
    folder, which package_dirs() maps on its own.
    """
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for directory, subdirs, files in os.walk(folder):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            parts = [package, *Path(directory).relative_to(folder).parts]
            for file in files:
                if file.endswith(".py"):
                    stem = file[: -len(".py")]
                    name = ".".join(parts if stem == "__init__" else [*parts, stem])
                    modules[name] = Path(directory) / file
    return dict(sorted(modules.items()))


def public_modules() -> list[str]:
    """The modules a user may import: no `_private` part, no `__main__` (it runs the CLI)."""
    return [
        name
        for name in source_modules()
        if not any(part.startswith("_") for part in name.split("."))
    ]


# --------------------------------------------------------------------------- a live server


@dataclass
class Live:
    url: str
    app: object
    server: object


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 20.0) -> Iterator[Live]:
    """Run `app` under uvicorn on 127.0.0.1 (a free port) in a thread, until ready."""
    import httpx
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not become ready")
        time.sleep(0.02)
    try:
        yield Live(url, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout)


# --------------------------------------------------------------------------- images


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def tiny_images(n: int, seed: int = 1, size: int = 32) -> list[np.ndarray]:
    """n images like the tiny training set, cycling through the three classes."""
    rng = np.random.default_rng(seed)
    return [make_tiny_images(1, i % 3, rng, size)[0] for i in range(n)]


def corrupt_png() -> bytes:
    """A PNG cut short after its first 60 bytes: a readable header, then nothing."""
    return encode(tiny_images(1)[0])[:60]


CORRUPT = corrupt_png()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels with a tiny IDAT (one definition,
    shared with the soak benchmark's attack payloads)."""
    from tests.attacks import png_bomb as make

    return make(width, height)


# --------------------------------------------------------------------------- the service in-process


@contextlib.contextmanager
def running(model_path: Path, served=None, wait_ready: bool = True, **settings) -> Iterator:
    """A TestClient of the app with these settings (and this ServedModel, if given), its
    lifespan run, ready unless told not to wait."""
    import warnings

    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    with warnings.catch_warnings():  # starlette's notice that its TestClient will move to httpx2
        warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    app = create_app(Settings(model=model_path, **settings), model=served)
    with TestClient(app) as client:
        deadline = time.monotonic() + 20
        while wait_ready and client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.01)
        yield client


class Gate:
    """Wraps a ServedModel's run so a test decides when each batch may run."""

    def __init__(self, served, is_open: bool = True) -> None:
        self.opened, self.entered = threading.Event(), threading.Event()
        self.batches: list[int] = []
        if is_open:
            self.opened.set()
        inner = served.run

        def run(images: np.ndarray):
            self.entered.set()
            self.batches.append(len(images))
            assert self.opened.wait(30), "gate never opened"
            return inner(images)

        served.run = run


def wait_until(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll `condition()` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)


def expected(reference, files: list[bytes]) -> dict[str, np.ndarray]:
    """onnxruntime directly on the same decoded pixels."""
    return reference.run(np.stack([reference.decode(data) for data in files]))


def multipart(*files: bytes, names: list[str] | None = None) -> list[tuple]:
    names = names or [f"image{i}.png" for i in range(len(files))]
    parts = zip(names, files, strict=True)
    return [("files", (name, data, "application/octet-stream")) for name, data in parts]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(status: int, code: str, message: str) -> tuple[int, dict]:
    return status, {"error": {"code": code, "message": message}}


def answer(response) -> tuple[int, dict]:
    return response.status_code, response.json()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric_value(exposition: str, name: str) -> float:
    """The value of an unlabelled sample `name` in a Prometheus text exposition."""
    line = next(x for x in exposition.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


# --------------------------------------------------------------------------- model formats


def format_1_copy(source: Path, out: Path) -> Path:
    """A model file of format 1 made from `source`, a format-2 export with
    unknown_score=min_distance and no atypicality: the same graph without the
    `unknown_scores` output (there it equals `min_distances`, the score format-1 thresholds
    were calibrated on), and the metadata of format 1 (`distance`, no `unknown_score`)."""
    import onnx

    proto = onnx.load(str(source))
    keep = [o for o in proto.graph.output if o.name != "unknown_scores"]
    assert len(keep) == 4, [o.name for o in proto.graph.output]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["center_embed.unknown_score"] == "min_distance"
    props.pop("center_embed.unknown_score")
    props |= {"center_embed.format_version": "1", "center_embed.distance": "squared_euclidean"}
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return out


def small_model_info(threshold: str = "2.0", quantile: float = 0.9):
    """The metadata of a 2-class, 3-d model (classes a and b, thresholds 1.0 and 1.5 with
    a global 2.0) that scores by the squared distance: what the enrolment tests brute-force."""
    from center_embed import contract

    values = {
        "format_version": str(contract.MODEL_FORMAT_VERSION),
        "class_names": ["a", "b"],
        "embedding_dim": 3,
        "input_size": [8, 8],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "unknown_threshold": threshold,
        "class_thresholds": {"a": 1.0, "b": 1.5},
        "unknown_threshold_calibration": {"quantile": quantile},
        "unknown_score": "min_distance",
    }
    return contract.parse_metadata(contract.encode_metadata(values))
