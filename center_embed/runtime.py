"""Opening an exported model: one small interface over the inference runtimes.

This is the one place that opens inference runtimes; the HTTP service, the batch scorer,
the report and `export verify` all go through `OnnxModel`. What the file holds (names,
metadata, the distance formula) is center_embed.contract's. Two runtimes read the same
.onnx file as it is:

    onnxruntime   CPU, or CUDA with onnxruntime-gpu (extras `cpu` / `gpu`)
    openvino      CPU; fp32, or bf16 on CPUs with AVX512-BF16 / AMX (extra `openvino`)

A runtime is a `Backend`: it opens the file, says which device it runs on, and runs a uint8
batch to the graph's outputs (four, or five with `atypicality`). `choose_runtime` turns
`--runtime auto|onnxruntime|openvino` and `--precision auto|fp32|bf16|int8|fp16` into one
`RuntimeChoice` and says why (auto picks by what is installed and what the CPU supports).
`serve` and `score` default to auto: the fastest runtime and precision here, checked on
the file's self-check (a few held-out images and what the export's own runtime answered)
before use, with a fall back to onnxruntime at the file's own precision on a miss. The
library (`RuntimeOptions()`) and `verify` default to that reference itself. It imports
numpy and Pillow, and a runtime only when one is opened (never torch), so a serving
install stays small.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from center_embed.contract import (
    ATYPICALITY,
    FORMAT_1_OUTPUT_NAMES,
    INPUT_NAME,
    METADATA_PREFIX,
    OUTPUT_NAMES,
    UNKNOWN_SCORES,
    ModelInfo,
    SelfCheck,
    is_model_outputs,
    our_metadata,
    parse_metadata,
    read_metadata_props,
    run_batched,
)
from center_embed.errors import UserError, install_hint
from center_embed.imageio import decode_image

RUNTIMES = ("onnxruntime", "openvino")
RUNTIME_CHOICES = ("auto", *RUNTIMES)
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8", "fp16")
DEFAULT_RUNTIME = "onnxruntime"  # the library's and verify's: the export's own reference
# serve and score: the fastest runtime this machine has, checked by the file's self-check
# (OnnxModel falls back to the file's own precision when it misses)
SERVING_DEFAULT_RUNTIME = "auto"
DEFAULT_PRECISION = "auto"  # the fastest the chosen runtime gives on this file and CPU
EXTRA_FOR_RUNTIME = {"onnxruntime": "cpu", "openvino": "openvino"}
log = logging.getLogger("center_embed.runtime")
# /proc/cpuinfo flags that give bf16 matrix arithmetic (AVX512-BF16 dot products, AMX tiles)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


# --------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model file, as the user asked: one value from the CLI flags (or a
    caller) to `OnnxModel`, the service, the scorers, `verify` and `bench`.

    device: auto | cpu | cuda (onnxruntime's provider; OpenVINO runs on the CPU).
    threads: intra-op threads of one run (0: the runtime's default, one per core).
    runtime / precision: see `choose_runtime` (default: onnxruntime at the file's precision).
    """

    device: str = "auto"
    threads: int = 0
    runtime: str = DEFAULT_RUNTIME
    precision: str = DEFAULT_PRECISION


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime runs the file, at which precision, and why (for logs and /v1/model)."""

    runtime: str  # onnxruntime | openvino
    precision: str  # what the arithmetic runs in: fp32 | bf16 | int8 | fp16
    reason: str


def installed_runtimes() -> list[str]:
    """The runtimes importable here, in RUNTIMES order (found without importing them)."""
    return [name for name in RUNTIMES if importlib.util.find_spec(name) is not None]


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_bf16_flags() -> list[str]:
    """The bf16 features this CPU has; where /proc/cpuinfo is unreadable, OpenVINO's view."""
    flags = cpu_flags()
    if flags:
        return [f for f in BF16_CPU_FLAGS if f in flags]
    if "openvino" in installed_runtimes():
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return ["openvino:BF16"] if "BF16" in capabilities else []
    return []


def choose_runtime(
    runtime: str = "auto",
    precision: str = "auto",
    *,
    file_precision: str = "fp32",
    device: str = "auto",
    installed: list[str] | None = None,
    bf16_flags: list[str] | None = None,
) -> RuntimeChoice:
    """The runtime and precision for a file, from the flags; UserError for what cannot run.

    auto runtime: onnxruntime for CUDA, else OpenVINO where installed, else onnxruntime.
    auto precision: bf16 under OpenVINO on a bf16 CPU for an fp32 file, else the file's own.
    """
    if runtime not in RUNTIME_CHOICES:
        raise UserError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, not {runtime!r}")
    if precision not in PRECISION_CHOICES:
        raise UserError(
            f"precision must be one of {', '.join(PRECISION_CHOICES)}, not {precision!r}"
        )
    installed = installed_runtimes() if installed is None else installed
    wants_cuda = device.startswith("cuda") or device == "gpu"
    if runtime == "auto":
        runtime, why = _auto_runtime(installed, wants_cuda)
    else:
        why = f"{runtime} asked for"
        if runtime not in installed:
            extra = EXTRA_FOR_RUNTIME[runtime]
            raise UserError(f"{runtime} is not installed; {install_hint(extra)}")
        if runtime == "openvino" and wants_cuda:
            raise UserError("OpenVINO runs on the CPU here; CUDA needs --runtime onnxruntime")
    bf16_flags = cpu_bf16_flags() if bf16_flags is None else bf16_flags
    chosen, how = _precision(runtime, precision, file_precision, bf16_flags)
    return RuntimeChoice(runtime, chosen, f"{why}; {how}")


def _auto_runtime(installed: list[str], wants_cuda: bool) -> tuple[str, str]:
    if not installed:
        raise UserError(f"no ONNX runtime is installed; {install_hint('cpu')}")
    if wants_cuda:
        if "onnxruntime" not in installed:
            raise UserError(f"CUDA needs onnxruntime-gpu; {install_hint('gpu')}")
        return "onnxruntime", "auto: CUDA asked for, onnxruntime"
    if "openvino" in installed:
        return "openvino", "auto: OpenVINO is installed (the fastest measured on x86 CPUs)"
    return "onnxruntime", "auto: onnxruntime, the one runtime installed"


def _precision(runtime: str, asked: str, file_precision: str, bf16: list[str]) -> tuple[str, str]:
    """(precision, why): the file's own precision always runs; bf16 is OpenVINO's on fp32."""
    can_bf16 = runtime == "openvino" and file_precision == "fp32" and bool(bf16)
    if asked == "auto":
        if can_bf16:
            return "bf16", f"auto: bf16, the CPU has {', '.join(bf16)}"
        return file_precision, f"auto: the file's {file_precision}"
    if asked == file_precision:
        return asked, f"{asked} asked for"
    if asked == "bf16":
        if runtime != "openvino":
            raise UserError("bf16 needs --runtime openvino (onnxruntime has no bf16 CPU path)")
        if file_precision != "fp32":
            raise UserError(f"bf16 runs an fp32 file; this one is {file_precision}")
        if not bf16:
            raise UserError("this CPU has neither AVX512-BF16 nor AMX: bf16 is not available")
        return "bf16", f"bf16 asked for; the CPU has {', '.join(bf16)}"
    raise UserError(
        f"the file is {file_precision}: --precision {asked} needs a file exported as {asked} "
        f"(`center-embed export --{asked}`), or --precision auto"
        if asked != "fp32"
        else f"the file is {file_precision}: --precision fp32 needs the fp32 export"
    )


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """One runtime's open model: what OnnxModel needs of it."""

    name: str  # the runtime: onnxruntime | openvino
    provider: str  # the device it runs on, in the runtime's words
    threads: int  # intra-op threads asked for (0: the runtime's default)

    def io_names(self) -> tuple[list[str], list[str]]: ...  # (inputs, outputs)
    def metadata_props(self) -> dict[str, str]: ...
    def run(self, images: np.ndarray) -> list[np.ndarray]: ...  # the file's outputs, in order


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str = "auto") -> list[str]:
    """CUDA when the GPU build of onnxruntime and a GPU are present (or asked for), else CPU."""
    available = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "gpu"):
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                "CUDA was asked for but this onnxruntime has no CUDA provider; "
                "pip install '.[gpu]' (onnxruntime-gpu) instead of onnxruntime"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise UserError(f"device must be auto, cpu or cuda, not {device!r}")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(path: str | Path, device: str = "auto", threads: int = 0, spinning: bool = True):
    """An onnxruntime InferenceSession with every graph optimisation on.

    threads: intra-op threads (0: onnxruntime's default, one per core).
    spinning: let idle intra-op threads busy-wait for work. Good for back-to-back runs in one
    process; a server sharing its cores with request handling is faster without it
    (measured here: 2.5 instead of 3.3 ms of CPU per image).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime's own exception types for a file it cannot load (not a protobuf, an empty
    # or broken graph, an operator or opset it does not have)
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    unreadable = (state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument,
                  state.NotImplemented, state.Fail)  # fmt: skip
    try:
        return ort.InferenceSession(str(path), options, providers=choose_providers(device))
    except unreadable as e:
        lines = str(e).split("failed:")[-1].strip().splitlines()  # the reason, without the path
        reason = f" ({lines[0][:200]})" if lines else ""
        raise UserError(f"{path} is not a readable ONNX model{reason}") from None


class OnnxRuntimeBackend:
    """onnxruntime: one InferenceSession (thread-safe: concurrent runs share it)."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: str, threads: int, spinning: bool) -> None:
        self.session = create_session(path, device, threads, spinning)
        self.threads = threads
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        """The execution provider actually in use (the first one the session kept)."""
        return self.session.get_providers()[0]

    def io_names(self) -> tuple[list[str], list[str]]:
        return [i.name for i in self.session.get_inputs()], list(self.outputs)

    def metadata_props(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {INPUT_NAME: images})


def open_backend(
    choice: RuntimeChoice, path: Path, device: str, threads: int, spinning: bool, streams: int
) -> Backend:
    if choice.runtime == "openvino":
        from center_embed.runtime_openvino import OpenVinoBackend

        return OpenVinoBackend(path, choice.precision, threads, streams)
    return OnnxRuntimeBackend(path, device, threads, spinning)


# --------------------------------------------------------------------------- the model


class OnnxModel:
    """An exported center-embed model, ready to run on uint8 image batches.

    options: the device, threads, runtime and precision asked for (`RuntimeOptions`).
    spinning: let idle intra-op threads busy-wait (onnxruntime; off in a server).
    streams: OpenVINO's concurrent inference streams, each with `threads` threads, for callers
    that run batches from several threads at once (an onnxruntime session needs none).
    """

    def __init__(
        self,
        path: str | Path,
        options: RuntimeOptions | None = None,
        *,
        spinning: bool = True,
        streams: int = 1,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"model not found: {self.path}")
        self.options = options = options or RuntimeOptions()
        self.choice = choose_runtime(
            options.runtime,
            options.precision,
            file_precision=_file_precision(self.path),
            device=options.device,
        )
        self.backend = open_backend(
            self.choice, self.path, options.device, options.threads, spinning, streams
        )
        self.info = parse_metadata(self.backend.metadata_props(), str(self.path))
        inputs, outputs = self.backend.io_names()
        if inputs != [INPUT_NAME] or not is_model_outputs(outputs):
            raise UserError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; expected "
                f"[{INPUT_NAME!r}] and {list(OUTPUT_NAMES)} (and {ATYPICALITY!r}), or a "
                f"format-1 file's {list(FORMAT_1_OUTPUT_NAMES)}"
            )
        self.output_names = tuple(outputs)  # what the file itself computes
        h, w = self.info.input_size
        if h != w:  # every reader here (decoding, scoring, serving) resizes to a square
            raise UserError(f"{self.path}: only square inputs are supported, got {h}x{w}")
        self.image_size = h  # the side of the square uint8 images the graph takes
        # Another runtime or precision than the export's own runs the file's self-check
        # first, and falls back to the file's own precision on a miss.
        self.self_check = self._check_self(options, spinning, streams)

    def _check_self(
        self, options: RuntimeOptions, spinning: bool, streams: int
    ) -> dict[str, Any] | None:
        """None for the export's own runtime and precision, or a file without a self-check;
        else the check's figures, after falling back to onnxruntime at the file's precision
        (said in one log line) when they are outside SELF_CHECK_TOLERANCES."""
        raw = self.info.metadata.get(METADATA_PREFIX + "self_check")
        if not raw or (self.choice.runtime, self.choice.precision) == (
            "onnxruntime", self.info.precision
        ):  # fmt: skip
            return None
        check = SelfCheck.from_metadata(raw, str(self.path))
        result = compare_self_check(self.run(check.images), check, self.info)
        result["checked"] = f"{self.choice.runtime} {self.choice.precision}"
        if result["passed"]:
            return result
        fallback = RuntimeChoice(
            "onnxruntime", self.info.precision,
            f"fallback: {result['checked']} failed the file's self-check ({result['summary']})",
        )  # fmt: skip
        log.warning("%s: %s", self.path.name, fallback.reason)
        self.backend = open_backend(
            fallback, self.path, options.device, options.threads, spinning, streams
        )
        self.choice = fallback
        return result | {"fallback": True}

    @property
    def provider(self) -> str:
        """The device in use, in the runtime's words (e.g. CPUExecutionProvider, CPU)."""
        return self.backend.provider

    @property
    def runtime(self) -> dict[str, Any]:
        """What runs the model and why: for /v1/model, the logs and `inspect`."""
        return {**asdict(self.choice), "provider": self.provider, "threads": self.backend.threads,
                "self_check": self.self_check}  # fmt: skip

    @property
    def has_atypicality(self) -> bool:
        return ATYPICALITY in self.output_names

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images uint8 (N, H, W, 3) RGB -> embeddings (N, D), distances (N, C),
        labels (N,) int64, min_distances (N,), unknown_scores (N,) and atypicality (N,),
        whatever the file computes itself: a format-1 file's unknown score is its min
        distance, and a file without the atypicality output has zeros."""
        h, w = self.info.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(f"images must be uint8 (N, {h}, {w}, 3), got {images.dtype} "
                             f"{images.shape}")  # fmt: skip
        values = self.backend.run(np.ascontiguousarray(images))
        out = dict(zip(self.output_names, values, strict=True))
        if UNKNOWN_SCORES not in out:  # format 1: calibrated on its min distance
            out[UNKNOWN_SCORES] = out["min_distances"]
        if ATYPICALITY not in out:
            out[ATYPICALITY] = np.zeros(len(images), np.float32)
        return out

    def run_batched(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """`run` over any number of images (a memory-mapped split too), in batches."""
        return run_batched(self.run, images, batch_size)

    def decode(self, data: bytes | str | Path, max_pixels: int | None = None) -> np.ndarray:
        """One image (bytes or a path) as uint8 (H, W, 3), by the model's resize policy."""
        return decode_image(data, self.image_size, max_pixels)

    def unknown(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """True where an image's unknown score exceeds its nearest class's threshold."""
        return self.info.unknown(outputs[UNKNOWN_SCORES], outputs["labels"])


# What another runtime or precision must reproduce of the file's self-check (a few dozen
# images): nearly every label and unknown flag (one near-tie may flip in bf16), and the
# min distances and unknown scores within 5% of the largest (bf16 keeps 8 bits of mantissa;
# export/verify.RUNTIME_TOLERANCES measures the same on a whole split).
SELF_CHECK_TOLERANCES = {"label_agreement": 0.9, "unknown_agreement": 0.9, "scores": 0.05}


def compare_self_check(
    out: dict[str, np.ndarray], check: SelfCheck, info: ModelInfo
) -> dict[str, Any]:
    """A runtime's outputs on the self-check images against what the export recorded."""
    labels = float((out["labels"] == check.labels).mean())
    flags = float((info.unknown(out[UNKNOWN_SCORES], out["labels"]) == check.unknown).mean())
    scale = max(float(np.abs(check.min_distances).max(initial=0.0)),
                float(np.abs(check.unknown_scores).max(initial=0.0)), 1e-12)  # fmt: skip
    error = (
        max(
            float(np.abs(out["min_distances"] - check.min_distances).max(initial=0.0)),
            float(np.abs(out[UNKNOWN_SCORES] - check.unknown_scores).max(initial=0.0)),
        )
        / scale
    )
    tol = SELF_CHECK_TOLERANCES
    passed = labels >= tol["label_agreement"] and flags >= tol["unknown_agreement"]
    passed = passed and error <= tol["scores"]
    return {
        "images": len(check.labels), "label_agreement": labels, "unknown_agreement": flags,
        "scores_error": error, "tolerances": tol, "passed": passed,
        "summary": f"{len(check.labels)} images: labels {labels:.0%}, unknown flags "
        f"{flags:.0%}, scores {error:.2e} of the largest",
    }  # fmt: skip


def _file_precision(path: Path) -> str:
    """The precision the file was exported in; fp32 where it cannot be read (the runtime
    then reports the file as unreadable, in its own words)."""
    try:
        return our_metadata(read_metadata_props(path)).get("precision", "fp32")
    except UserError:
        return "fp32"


def describe(info: ModelInfo) -> dict[str, Any]:
    """Metadata as plain JSON-able values (JSON strings decoded), for `inspect` and /v1/model."""
    out: dict[str, Any] = {}
    for name, value in sorted(our_metadata(info.metadata).items()):
        try:
            out[name] = json.loads(value)
        except (ValueError, TypeError):
            out[name] = value
    out.setdefault("unknown_score", info.unknown_score)  # format 1: "min_distance"
    if isinstance(out.get("self_check"), dict):  # its images are for runtimes, not readers
        out["self_check"] = {"images": len(out["self_check"].get("labels", []))}
    return out
