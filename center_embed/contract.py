"""The ONNX file contract: what a center-embed model file holds, and how to read it.

An exported model (docs/export.md, "The ONNX contract") is one ONNX file with, in model
format 2:

    input   `images`         uint8 (N, H, W, 3) RGB
    outputs `embeddings`     float32 (N, D)
            `distances`      float32 (N, C)  ‖e − c‖² to every center: a squared Euclidean
                                             distance, >= 0 (a matmul, clamped at 0)
            `labels`         int64 (N,)      the nearest center
            `min_distances`  float32 (N,)    the squared distance to it, >= 0
            `unknown_scores` float32 (N,)    the evidence that the image belongs to no
                                             class, higher = more unknown; its formula is
                                             the metadata key `unknown_score`
                                             (UNKNOWN_SCORE_KINDS); the `unknown` flag is
                                             unknown_scores > threshold[label]
            `atypicality`    float32 (N,)    optional: how far the image's low-level feature
                                             statistics lie beyond the training images', 0
                                             for typical images; a part of the unknown score
                                             (export/atypicality.py), of no distance
    the float32 initializer `centers` (C, D) that the distance matmul reads
    metadata_props `center_embed.<key>` (METADATA_KEYS), non-strings stored as JSON

Files of format 1 (exported before 2026-12-05) have no `unknown_scores`; their `distances`
are of the kind their `distance` key names (DISTANCE_KINDS: possibly ‖e − c‖² − ‖e‖², which
can be negative) with the atypicality added, and every reader gives them an unknown score
equal to their min distance, which is what their threshold was calibrated on.

The exporter writes these names through this module and every reader (onnxruntime
sessions, the service, the batch scorer, the report) reads them through it. It imports
numpy only (never torch, onnx or onnxruntime), so a serving install can use all of it.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.errors import UserError

MODEL_FORMAT_VERSION = 2  # what export writes
READABLE_FORMAT_VERSIONS = (1, 2)
INPUT_NAME = "images"
UNKNOWN_SCORES = "unknown_scores"
ATYPICALITY = "atypicality"  # an optional output; absent, it reads as 0
# Every format-2 model has these, in this order (then, optionally, the atypicality).
OUTPUT_NAMES = ("embeddings", "distances", "labels", "min_distances", UNKNOWN_SCORES)
FORMAT_1_OUTPUT_NAMES = OUTPUT_NAMES[:4]  # format 1: no unknown_scores
# What a reader returns for every file, whatever it computes itself.
ALL_OUTPUT_NAMES = (*OUTPUT_NAMES, ATYPICALITY)
# The share of training images whose atypicality is 0, unless export is told otherwise
# (why this value: export/atypicality.py).
DEFAULT_ATYPICALITY_QUANTILE = 0.98


def is_model_outputs(names: list[str]) -> bool:
    """True for the outputs of a center-embed model, in order: those of format 2 or of
    format 1, each with or without the atypicality."""
    return list(names) in [
        [*base, *extra]
        for base in (OUTPUT_NAMES, FORMAT_1_OUTPUT_NAMES)
        for extra in ((), (ATYPICALITY,))
    ]


CENTERS_INITIALIZER = "centers"
METADATA_PREFIX = "center_embed."
DISTANCE = "squared_euclidean"  # what `distances` holds in files that do not say

# Every kind of `distances` a model may declare in its `distance` metadata, and what it is.
# A reader computes distances to centers only through `distances` and a class's center
# only through `class_center` below, so a new kind is added here and nowhere else.
#
# squared_euclidean_minus_norm, ‖e − c‖² − ‖e‖² = ‖c‖² − 2·e·c, is the nearest-center rule's
# own linear decision function: for one image it ranks the centers exactly as the squared
# distance does (same label, same neighbours), but across images it does not reward a short
# embedding, which is what an image unlike every class gives. As the unknown score it
# measured far better than the squared distance on far-OOD images (docs/benchmarks.md).
# It can be negative.
DISTANCE_KINDS = {
    "squared_euclidean": "‖e − c‖² between the embedding and each center",
    "squared_euclidean_minus_norm": "‖e − c‖² − ‖e‖² = ‖c‖² − 2·e·c (may be negative)",
}

# The formulas of `unknown_scores` (metadata key `unknown_score`), each the minimum over
# the centers of a per-center score of DISTANCE_KINDS, plus the image's atypicality where
# the file has that output. The per-center score also picks the label (its argmin, which
# is the argmin of the distances for both). Format-1 files score by their min distance.
UNKNOWN_SCORE_KINDS = {
    "min_distance": "min over centers of ‖e − c‖², plus the atypicality",
    "min_distance_minus_norm": "min over centers of ‖e − c‖² − ‖e‖², plus the atypicality",
}
SCORE_DISTANCE_KIND = {  # the per-center score each formula takes the minimum of
    "min_distance": "squared_euclidean",
    "min_distance_minus_norm": "squared_euclidean_minus_norm",
}
DEFAULT_UNKNOWN_SCORE = "min_distance_minus_norm"  # what export writes unless told

# The Open Inference Protocol (KServe / Triton "v2") and a Triton model repository name the
# model and its tensors' element types; the service's /v2 routes and export's Triton writer
# both take them from here, so a client sees the same model behind either.
PROTOCOL_MODEL_NAME = "center_embed"
PROTOCOL_DATATYPES = {"uint8": "UINT8", "int64": "INT64", "float32": "FP32", "float16": "FP16"}


def protocol_version(onnx_model_version: int) -> str:
    """The model's version in the protocol and its Triton version folder: the ONNX file's
    `model_version` field when the exporter set one, else "1" (Triton's first version)."""
    return str(onnx_model_version) if onnx_model_version > 0 else "1"


# Every metadata key the exporter writes (after METADATA_PREFIX), and what it holds.
METADATA_KEYS = {
    "format_version": "MODEL_FORMAT_VERSION, as a string",
    "class_names": "class names, index = label",
    "embedding_dim": "D",
    "num_classes": "C",
    "distance": "format 1: what `distances` holds, a key of DISTANCE_KINDS",
    "unknown_score": "format 2: the formula of `unknown_scores`, a key of UNKNOWN_SCORE_KINDS",
    "input_layout": "the input's layout, e.g. NHWC uint8 RGB",
    "input_size": "[H, W]",
    "resize": "how an image is brought to [H, W]",
    "mean": "per-channel mean of pixels/255, applied in the graph",
    "std": "per-channel std of pixels/255, applied in the graph",
    "precision": "fp32, fp16 or int8",
    "training": "update rule, λ, α, epochs, accuracies, data source of the run",
    "exporter": "torch version, exporter mode and opset",
    "package_version": "the center-embed version that exported the file",
    "verification": "parity with torch, measured at export",
    "unknown_threshold": "unknown score above which an image is unknown ('' if none)",
    "class_thresholds": "the same per class",
    "unknown_threshold_calibration": "how the threshold was computed, on which images",
    "precision_loss": "accuracy of a reduced-precision model against fp32",
    "enrolment": "classes enrolled or removed since training: action, class, images, time, source",
    "atypicality": "how the `atypicality` output was fitted: layers, images, quantile, weight",
    "self_check": "held-out images (uint8, base64 .npy) and the labels, unknown flags, min "
    "distances and unknown scores the export's own runtime gave them (SelfCheck)",
}


@dataclass
class ModelInfo:
    """What an exported model says about itself (its `center_embed.*` metadata)."""

    class_names: list[str]
    embedding_dim: int
    input_size: tuple[int, int]  # (H, W)
    mean: list[float]
    std: list[float]
    distance: str  # format 1: what its `distances` hold; format 2: squared_euclidean
    precision: str
    unknown_threshold: float | None
    class_thresholds: dict[str, float] | None
    metadata: dict[str, str] = field(default_factory=dict)  # every key, raw strings
    format_version: int = MODEL_FORMAT_VERSION
    unknown_score: str = DEFAULT_UNKNOWN_SCORE  # format 1: "min_distance" as declared

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def true_distances(self) -> bool:
        """Whether `distances` are ‖e − c‖² (format 2), not format 1's declared kind."""
        return self.format_version > 1

    @property
    def score_kind(self) -> str:
        """The per-center score (a DISTANCE_KINDS key) whose minimum, plus the atypicality,
        is the unknown score and whose argmin is the label: format 1, its distance kind."""
        if self.format_version == 1:
            return self.distance
        return SCORE_DISTANCE_KIND[self.unknown_score]

    def label_thresholds(self) -> np.ndarray | None:
        """(C,) float32: the unknown threshold of each label, its class's own where the
        model has one and the global one otherwise; None when the model has no threshold."""
        if self.unknown_threshold is None:
            return None
        per_class = self.class_thresholds or {}
        values = [per_class.get(name, self.unknown_threshold) for name in self.class_names]
        return np.asarray(values, dtype=np.float32)

    def unknown(self, unknown_scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """True where an image's unknown score exceeds the threshold of its nearest class
        (per-class thresholds: each class is calibrated to flag the same share of its own
        held-out images); all False when the model has no threshold."""
        thresholds = self.label_thresholds()
        if thresholds is None:
            return np.zeros(len(unknown_scores), dtype=bool)
        return np.asarray(unknown_scores) > thresholds[np.asarray(labels, dtype=np.int64)]


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """{key: value} -> {center_embed.key: text}, non-strings as JSON; unknown keys refused."""
    unknown = sorted(set(values) - set(METADATA_KEYS))
    if unknown:
        raise ValueError(f"not model metadata keys: {', '.join(unknown)}")
    return {
        METADATA_PREFIX + key: value if isinstance(value, str) else json.dumps(value)
        for key, value in values.items()
    }


def set_metadata(proto, values: dict[str, Any]) -> None:
    """Set `center_embed.<key>` on an onnx ModelProto's metadata_props (encode_metadata's
    text), replacing keys already there. Duck-typed, so this module needs no onnx."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, text in encode_metadata(values).items():
        if key in existing:
            existing[key].value = text
        else:
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, text


def our_metadata(props: dict[str, str]) -> dict[str, str]:
    """The `center_embed.*` entries of metadata_props, prefix removed, raw strings."""
    n = len(METADATA_PREFIX)
    return {k[n:]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}


def parse_metadata(props: dict[str, str], source: str = "model") -> ModelInfo:
    """Read our metadata_props, raising UserError when they are absent or malformed."""
    ours = our_metadata(props)
    if "format_version" not in ours:
        raise UserError(f"{source} has no center_embed metadata: not exported by center-embed")
    try:
        version = int(ours["format_version"])
        if version not in READABLE_FORMAT_VERSIONS:
            raise UserError(
                f"{source} has model format version {version}; this center-embed reads "
                f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
            )
        if version == 1:
            kind = _known(ours.get("distance", DISTANCE), DISTANCE_KINDS, "distance", source)
            score = "min_distance"
        else:
            score = ours.get("unknown_score", DEFAULT_UNKNOWN_SCORE)
            score = _known(score, UNKNOWN_SCORE_KINDS, "unknown_score", source)
            kind = "squared_euclidean"
        threshold = ours.get("unknown_threshold")
        per_class = ours.get("class_thresholds")
        return ModelInfo(
            class_names=list(json.loads(ours["class_names"])),
            embedding_dim=int(ours["embedding_dim"]),
            input_size=tuple(json.loads(ours["input_size"])),  # type: ignore[arg-type]
            mean=[float(v) for v in json.loads(ours["mean"])],
            std=[float(v) for v in json.loads(ours["std"])],
            distance=kind,
            precision=ours.get("precision", "fp32"),
            unknown_threshold=float(threshold) if threshold not in (None, "") else None,
            class_thresholds=json.loads(per_class) if per_class else None,
            metadata=dict(props),
            format_version=version,
            unknown_score=score,
        )
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{source} has malformed center_embed metadata ({e!r})") from None


def _known(kind: str, table: dict[str, str], key: str, source: str) -> str:
    """`kind` when `table` (DISTANCE_KINDS, UNKNOWN_SCORE_KINDS) knows it; else a UserError
    naming the metadata `key` it was read from."""
    if kind not in table:
        raise UserError(
            f"{source} declares {key} {kind!r}, which this center-embed does not know "
            f"({', '.join(table)}): it was exported by a newer version"
        )
    return kind


# --------------------------------------------------------------------------- outputs


def distances(
    embeddings: np.ndarray,
    centers: np.ndarray,
    kind: str = DISTANCE,
    center_norms: np.ndarray | None = None,
    atypicality: np.ndarray | None = None,
) -> np.ndarray:
    """(N, D), (C, D) -> (N, C) float32 distances of the model's `kind`, as its graph
    computes them. `center_norms` (C,) = ‖c‖² may be passed precomputed. `atypicality` (N,),
    the images' own output of that name, is added to each of their distances, as the graph
    adds it (an embedding given without its image has none: pass nothing)."""
    if kind == "squared_euclidean":
        d = squared_distances(embeddings, centers, center_norms)
    elif kind == "squared_euclidean_minus_norm":
        d = _minus_norm(embeddings.astype(np.float32, copy=False), centers, center_norms)
    else:
        raise ValueError(f"unknown distance kind {kind!r}")
    if atypicality is not None:
        d += np.asarray(atypicality, np.float32)[:, None]
    return d


def class_center(embeddings: np.ndarray, kind: str = DISTANCE) -> np.ndarray:
    """(n, D) embeddings of one class's images -> its center (D,) float32 in the space the
    distance `kind` measures: for both kinds, the mean (the point that minimises the summed
    distance to them, and what training's running-average rule converges to)."""
    if embeddings.ndim != 2 or not len(embeddings):
        raise ValueError(f"need (n >= 1, D) embeddings, got shape {embeddings.shape}")
    if kind in ("squared_euclidean", "squared_euclidean_minus_norm"):
        return embeddings.astype(np.float64).mean(0).astype(np.float32)
    raise ValueError(f"unknown distance kind {kind!r}")


def _minus_norm(e: np.ndarray, centers: np.ndarray, center_norms: np.ndarray | None) -> np.ndarray:
    """‖c‖² − 2·e·Cᵀ (N, C) for float32 embeddings `e`: the one matrix product the squared
    distance and the minus-norm score share."""
    if center_norms is None:
        center_norms = (centers.astype(np.float64) ** 2).sum(1).astype(np.float32)
    return center_norms[None, :] - 2 * e @ centers.T


def squared_distances(
    embeddings: np.ndarray, centers: np.ndarray, center_norms: np.ndarray | None = None
) -> np.ndarray:
    """(N, D), (C, D) -> (N, C) float32, as the graph computes it: ‖e‖² − 2·e·Cᵀ + ‖c‖²,
    clamped at 0. `center_norms` (C,) may be passed precomputed (a server reuses them)."""
    e = embeddings.astype(np.float32, copy=False)
    if center_norms is None:
        center_norms = (centers.astype(np.float64) ** 2).sum(1).astype(np.float32)
    d = (e * e).sum(1, keepdims=True) - 2 * e @ centers.T + center_norms[None, :]
    return np.maximum(d, 0, out=d)


def center_scores(
    embeddings: np.ndarray,
    centers: np.ndarray,
    score_kind: str,
    true_distances: bool = True,
    atypicality: np.ndarray | None = None,
    center_norms: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """(N, D), (C, D) -> distances (N, C), labels, min_distances and unknown_scores (N,),
    as a model computes them from its embeddings: the label is the argmin of the per-center
    score of `score_kind` (ModelInfo.score_kind), the unknown score its minimum plus the
    `atypicality` (N,) (the images' output of that name; an embedding given without its
    image has none: pass nothing). `true_distances` (format 2): `distances` are ‖e − c‖²;
    False (format 1): they are the per-center scores themselves, atypicality included."""
    e = embeddings.astype(np.float32, copy=False)
    minus_norm = _minus_norm(e, centers, center_norms)  # (N, C), the one matmul
    squared = np.maximum(minus_norm + (e * e).sum(1, keepdims=True), 0)  # ‖e − c‖²
    by_kind = {"squared_euclidean": squared, "squared_euclidean_minus_norm": minus_norm}
    if score_kind not in by_kind:
        raise ValueError(f"unknown distance kind {score_kind!r}")
    score = by_kind[score_kind]
    if atypicality is not None:
        score = score + np.asarray(atypicality, np.float32)[:, None]
    rows = np.arange(len(score))
    labels = score.argmin(1)
    unknown_scores = score[rows, labels]
    d = squared if true_distances else score
    return {"distances": d, "labels": labels, "min_distances": d[rows, labels],
            "unknown_scores": unknown_scores}  # fmt: skip


def empty_outputs(num_classes: int, embedding_dim: int) -> dict[str, np.ndarray]:
    """The model's outputs for no images, with their dtypes and widths."""
    return {
        "embeddings": np.zeros((0, embedding_dim), np.float32),
        "distances": np.zeros((0, num_classes), np.float32),
        "labels": np.zeros(0, np.int64),
        "min_distances": np.zeros(0, np.float32),
        UNKNOWN_SCORES: np.zeros(0, np.float32),
        ATYPICALITY: np.zeros(0, np.float32),
    }


def run_batched(
    run: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """`run` (one batch -> the model's outputs) over any number of images, a memory-mapped
    split too, `batch_size` at a time; no images give `run`'s answer to an empty batch."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for name, value in run(np.asarray(images[start : start + batch_size])).items():
            parts.setdefault(name, []).append(value)
    if not parts:
        return run(np.asarray(images[:0]))
    return {name: np.concatenate(values) for name, values in parts.items()}


# --------------------------------------------------------------------------- the centers
#
# /v1/distances and /v1/centers need the centers as numpy, and the serving install has
# neither onnx nor torch, and onnxruntime does not hand out initializers. ONNX files are
# protocol buffers, and the few fields we need have been fixed since ONNX 1.0, so a short
# wire-format reader suffices:
#
#     ModelProto.model_version = 5 (int64)
#     ModelProto.graph = 7  ->  GraphProto.initializer = 5 (repeated TensorProto)
#     TensorProto: dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9,
#                  data_location = 14 (1: external data, which our files never use)
#
# The service cross-checks what it read against the graph's own distances at warm-up.

_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto.DataType


def read_centers(path: str | Path, name: str = CENTERS_INITIALIZER) -> np.ndarray:
    """The initializer `name` of an ONNX file as float32 (C, D); UserError if absent."""
    data = memoryview(Path(path).read_bytes())
    try:
        for number, _, graph in _fields(data):
            if number != 7:
                continue
            for field_number, _, tensor in _fields(graph):
                if field_number == 5 and _tensor_name(tensor) == name:
                    centers = _tensor(tensor)
                    if centers.ndim != 2:
                        raise ValueError(f"the centers have shape {centers.shape}, not (C, D)")
                    return centers
    except (ValueError, IndexError) as e:
        raise UserError(f"{path}: cannot read the {name!r} initializer ({e})") from None
    raise UserError(f"{path} has no {name!r} initializer: not exported by center-embed")


def read_model_version(path: str | Path) -> int:
    """The ONNX file's ModelProto.model_version (field 5; 0 when the exporter set none)."""
    data = memoryview(Path(path).read_bytes())
    try:
        for number, wire, value in _fields(data):
            if number == 5 and wire == 0:
                return int(value)
    except (ValueError, IndexError) as e:
        raise UserError(f"{path}: cannot read the model version ({e})") from None
    return 0


def read_metadata_props(path: str | Path) -> dict[str, str]:
    """ModelProto.metadata_props (field 14: key = 1, value = 2) of an ONNX file, for runtimes
    that do not hand them out (OpenVINO); onnxruntime's session gives the same map."""
    data = memoryview(Path(path).read_bytes())
    props: dict[str, str] = {}
    try:
        for number, wire, entry in _fields(data):
            if number != 14 or wire != 2:
                continue
            fields = {n: bytes(v).decode("utf-8") for n, w, v in _fields(entry) if w == 2}
            props[fields.get(1, "")] = fields.get(2, "")
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable ONNX model ({e})") from None
    return props


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value) for each field of one message; value is an int
    for varints and a memoryview for length-delimited and fixed-width fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = data[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor_name(message: memoryview) -> str | None:
    for number, _, value in _fields(message):
        if number == 8:
            return bytes(value).decode("utf-8", "replace")
    return None


def _tensor(message: memoryview) -> np.ndarray:
    dims: list[int] = []
    dtype, floats, raw = 1, None, None
    for number, wire, value in _fields(message):
        if number == 1:  # dims: packed (wire 2) or one varint per field
            if wire == 2:
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == 2:
            dtype = value
        elif number == 4 and wire == 2:
            floats = np.frombuffer(value, "<f4")
        elif number == 9:
            raw = value
        elif number == 14 and value == 1:
            raise ValueError("the centers are stored as external data")
    if dtype not in _DTYPES:
        raise ValueError(f"the centers have unsupported data type {dtype}")
    if raw is not None:
        array = np.frombuffer(raw, np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    elif floats is not None and dtype == 1:
        array = floats
    else:
        raise ValueError("the centers tensor holds no data")
    return array.reshape(dims).astype(np.float32)


# --------------------------------------------------------------------------- the self-check


@dataclass
class SelfCheck:
    """A model's own verification set: a few held-out images and what the export's own
    runtime (onnxruntime at the file's precision) answered for them. Another runtime or
    precision that opens the file runs them and must agree (runtime.SELF_CHECK_TOLERANCES)."""

    images: np.ndarray  # uint8 (n, H, W, 3)
    labels: np.ndarray  # (n,) int64
    unknown: np.ndarray  # (n,) bool
    min_distances: np.ndarray  # (n,) float32
    unknown_scores: np.ndarray  # (n,) float32

    def to_metadata(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(self.images, np.uint8), allow_pickle=False)
        return {
            "images": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "labels": self.labels.astype(int).tolist(),
            "unknown": self.unknown.astype(bool).tolist(),
            "min_distances": self.min_distances.astype(float).tolist(),
            "unknown_scores": self.unknown_scores.astype(float).tolist(),
        }

    @classmethod
    def from_metadata(cls, raw: str, source: str = "model") -> SelfCheck:
        try:
            values = json.loads(raw)
            images = np.load(io.BytesIO(base64.b64decode(values["images"])), allow_pickle=False)
            check = cls(
                images=np.asarray(images, np.uint8),
                labels=np.asarray(values["labels"], np.int64),
                unknown=np.asarray(values["unknown"], bool),
                min_distances=np.asarray(values["min_distances"], np.float32),
                unknown_scores=np.asarray(values["unknown_scores"], np.float32),
            )
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(f"{source} has a malformed self_check ({e!r:.200})") from None
        n = len(check.images)
        rows = (check.labels, check.unknown, check.min_distances, check.unknown_scores)
        if check.images.ndim != 4 or any(len(a) != n for a in rows):
            raise UserError(f"{source} has a malformed self_check (shapes disagree)")
        return check
