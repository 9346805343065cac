"""Enrolment: new classes from a few images' embeddings, without retraining.

Center loss makes a class a point in embedding space, so a new class is its images'
center (`contract.class_center`), and an image is scored against it with
`contract.center_scores` like any trained class: its distance, and the unknown score of the
model's per-center score kind (`ModelInfo.score_kind`). This module is the one place that
changes a model's set of classes:

    CenterSet         an immutable snapshot: class names, centers (C, D), per-class unknown
                      thresholds, a version that grows with each change, the enrolment log
    with_class        enrol (or replace, or add images to) one class -> a new CenterSet
    without_class     remove one class -> a new CenterSet
    CentersFile       the snapshot persisted beside the model (`<model>.centers.npz`):
                      atomic write + fsync, an exclusive lock around read-modify-write, and
                      a cheap check (os.stat) that tells a reader when to reload

The unknown threshold of an enrolled class (`enrolment_threshold`): each enrolment image's
score (of the model's score kind) to the center of the *other* images (held-out folds:
leave-one-out up to HELD_OUT_FOLDS images, that many folds beyond), plus the image's own
atypicality (the model output that is part of the unknown score), and the model's
calibration quantile of those scores, as export calibrates the model's own thresholds;
with fewer than MIN_THRESHOLD_IMAGES images the model's global threshold
(plus the images' largest atypicality).
Held-out distances, as export calibrates on held-out images: an image's distance to a
center it helped compute would understate what unseen images of the class give. Adding
the atypicality lets a class from another domain (sketches, documents), whose images are
all atypical for the training data, accept its own kind of image.

Imports numpy and the contract only (no torch, no onnx): the service, the scorer and the
CLI all use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import math
import os
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import (
    ModelInfo,
    center_scores,
    class_center,
    distances,
    run_batched,
)
from center_embed.errors import UserError
from center_embed.fileio import atomic_write, sha256_file

MAX_CLASS_NAME = 128  # characters
MIN_THRESHOLD_IMAGES = 5  # below it an enrolled class takes the model's global threshold
HELD_OUT_FOLDS = 20  # leave-one-out up to 20 images; 20 folds (20 center computations) beyond
DEFAULT_QUANTILE = 0.95  # when the model does not say how its threshold was calibrated
CENTERS_FILE_SUFFIX = ".centers.npz"
CENTERS_FILE_FORMAT = 1
MODES = ("replace", "add")


class EnrolmentError(UserError):
    """A refused change, with what kind of refusal it is (the service maps it to a status)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # bad_name | unknown_class | last_class | cannot_add | no_images


def normalize_class_name(name: str) -> str:
    """The one form of a class name that is compared and stored: Unicode NFC (the composed
    and decomposed spellings of "é" are one name) without surrounding whitespace."""
    return unicodedata.normalize("NFC", name).strip()


def check_class_name(name: str) -> str:
    """`name` normalised (`normalize_class_name`) when it may name a class: 1 to 128
    characters, every one printable (`str.isprintable`: no control or invisible format
    character, no line or paragraph separator U+2028/U+2029, no space but ' '), no '/'
    (a folder separator)."""
    name = normalize_class_name(name)
    if not name:
        raise EnrolmentError("bad_name", "the class name is empty")
    if len(name) > MAX_CLASS_NAME:
        raise EnrolmentError(
            "bad_name", f"the class name has {len(name)} characters; at most {MAX_CLASS_NAME}"
        )
    bad = next((c for c in name if not c.isprintable() or c == "/"), None)
    if bad is not None:
        raise EnrolmentError(
            "bad_name", f"the class name holds the character {bad!r} (U+{ord(bad):04X}): "
            "control characters, separators other than ' ', and '/' are not allowed",
        )  # fmt: skip
    return name


def calibration_quantile(info: ModelInfo) -> float:
    """The quantile the model's own unknown threshold was calibrated at (export's --quantile)."""
    raw = info.metadata.get("center_embed.unknown_threshold_calibration", "")
    try:
        quantile = float(json.loads(raw)["quantile"])
    except (ValueError, KeyError, TypeError):
        return DEFAULT_QUANTILE
    return quantile if 0 < quantile <= 1 else DEFAULT_QUANTILE


def enrolment_threshold(
    embeddings: np.ndarray,
    kind: str,
    quantile: float,
    fallback: float | None,
    atypicality: np.ndarray | None = None,
) -> tuple[float | None, str]:
    """(threshold, how it was chosen) for a class enrolled from `embeddings` (n, D), whose
    images have `atypicality` (n,) (None: zeros).

    The `quantile` of each image's distance to the center of the images outside its fold
    (module docstring), its atypicality included; `fallback` (the model's global threshold,
    plus the images' largest atypicality) below MIN_THRESHOLD_IMAGES images, None when the
    model has no threshold at all."""
    n = len(embeddings)
    if fallback is None:
        return None, "none: the model has no unknown threshold"
    if n < MIN_THRESHOLD_IMAGES:
        extra = float(np.max(atypicality)) if atypicality is not None and n else 0.0
        if extra > 0:  # images of another domain: the global threshold would refuse them
            return fallback + extra, (f"global threshold + the images' largest atypicality "
                                      f"(fewer than {MIN_THRESHOLD_IMAGES} images)")  # fmt: skip
        return fallback, f"global threshold (fewer than {MIN_THRESHOLD_IMAGES} images)"
    folds = np.arange(n) % min(n, HELD_OUT_FOLDS)
    held_out = np.empty(n, np.float32)
    for fold in np.unique(folds):
        inside = folds == fold
        center = class_center(embeddings[~inside], kind)
        own = None if atypicality is None else atypicality[inside]
        held_out[inside] = distances(embeddings[inside], center[None], kind, atypicality=own)[:, 0]
    threshold = float(np.quantile(held_out, quantile, method="inverted_cdf"))
    rule = f"q={quantile:g} of {n} held-out distances ({min(n, HELD_OUT_FOLDS)} folds)"
    return threshold, rule


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class CenterSet:
    """The classes a model scores against, frozen: a change makes a new CenterSet.

    names (C,), centers float32 (C, D) (read-only), thresholds by class name (absent: the
    model's global one), version (0: the model file's own classes), log (one entry per
    change: action, class, images, time, source), embeddings of enrolled classes (kept so
    that images can be added later: the new center is computed from all of them, in the
    model's space, as training's running mean does) and their images' atypicality (for the
    threshold; absent for a class: zeros)."""

    names: tuple[str, ...]
    centers: np.ndarray
    thresholds: dict[str, float]
    version: int
    distance: str  # the per-center score kind: thresholds and labels (ModelInfo.score_kind)
    model_sha256: str
    log: tuple[dict[str, Any], ...] = ()
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    atypicality: dict[str, np.ndarray] = field(default_factory=dict)
    true_distances: bool = True  # the model's format: 2, distances apart from the score

    def __post_init__(self) -> None:
        self.centers.setflags(write=False)
        if self.centers.shape[0] != len(self.names) or len(set(self.names)) != len(self.names):
            raise ValueError(f"{len(self.names)} names for centers {self.centers.shape}")

    @classmethod
    def from_model(cls, info: ModelInfo, centers: np.ndarray, sha256: str) -> CenterSet:
        """A model file's own classes (version 0), with the log its metadata carries."""
        raw = info.metadata.get("center_embed.enrolment", "")
        log = tuple(json.loads(raw)) if raw else ()
        return cls(
            names=tuple(info.class_names),
            centers=np.array(centers, np.float32),
            thresholds=dict(info.class_thresholds or {}),
            version=0,
            distance=info.score_kind,
            model_sha256=sha256,
            log=log,
            true_distances=info.true_distances,
        )

    def model_info(self, base: ModelInfo) -> ModelInfo:
        """`base` (the model's metadata) with these classes and thresholds: its `unknown`
        and `label_thresholds` then answer for this set."""
        thresholds = {n: self.thresholds[n] for n in self.names if n in self.thresholds}
        return dataclasses.replace(
            base, class_names=list(self.names), class_thresholds=thresholds or None
        )

    def scores(
        self, embeddings: np.ndarray, atypicality: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """(N, D) -> distances (N, C), labels, min_distances and unknown_scores (N,) against
        this set, as the model computes them (contract.center_scores); `atypicality` (N,),
        the images' model output, is part of the unknown score."""
        return center_scores(
            embeddings, self.centers, self.distance, self.true_distances, atypicality
        )

    def image_counts(self) -> dict[str, int]:
        """Images each enrolled class was computed from (trained classes are absent)."""
        return {name: len(e) for name, e in self.embeddings.items()}

    # ------------------------------------------------------------------ changes

    def with_class(
        self,
        name: str,
        embeddings: np.ndarray,
        *,
        info: ModelInfo,
        mode: str = "replace",
        source: str = "",
        atypicality: np.ndarray | None = None,
    ) -> CenterSet:
        """This set with `name` enrolled from `embeddings` (n, D), whose images have
        `atypicality` (n,) (None: zeros): a new class, or an existing one replaced (mode
        "replace"), or an enrolled one given more images (mode "add": its center from all
        its images so far)."""
        name = check_class_name(name)
        if mode not in MODES:
            raise EnrolmentError("bad_mode", f"mode must be one of {', '.join(MODES)}")
        if not len(embeddings):
            raise EnrolmentError("no_images", f"no images to enrol {name!r} from")
        if mode == "add" and name in self.names and name not in self.embeddings:
            raise EnrolmentError(
                "cannot_add", f"{name!r} is a trained class: its training images are not "
                "here to add to; replace it instead (mode=replace)",
            )  # fmt: skip
        own = np.zeros(len(embeddings), np.float32) if atypicality is None else atypicality
        if len(own) != len(embeddings):
            raise ValueError(f"{len(own)} atypicality values for {len(embeddings)} embeddings")
        if mode == "add" and name in self.embeddings:
            embeddings = np.concatenate([self.embeddings[name], embeddings])
            own = np.concatenate([self.atypicality_of(name), own])
        embeddings = np.asarray(embeddings, np.float32)
        own = np.asarray(own, np.float32)
        center = class_center(embeddings, self.distance)
        threshold, rule = enrolment_threshold(
            embeddings, self.distance, calibration_quantile(info), info.unknown_threshold, own
        )
        names, centers = list(self.names), self.centers.copy()
        if name in names:
            centers[names.index(name)] = center
        else:
            names.append(name)
            centers = np.concatenate([centers, center[None]])
        thresholds = {k: v for k, v in self.thresholds.items() if k != name}
        if threshold is not None:
            thresholds[name] = threshold
        action = "add" if mode == "add" and name in self.names else "enrol"
        entry = log_entry(action, name, len(embeddings), source, threshold, rule)
        return dataclasses.replace(
            self, names=tuple(names), centers=centers, thresholds=thresholds,
            version=self.version + 1, log=(*self.log, entry),
            embeddings={**self.embeddings, name: embeddings},
            atypicality={**self.atypicality, name: own},
        )  # fmt: skip

    def atypicality_of(self, name: str) -> np.ndarray:
        """(n,) the atypicality of an enrolled class's images (zeros where none was kept)."""
        return self.atypicality.get(name, np.zeros(len(self.embeddings[name]), np.float32))

    def without_class(self, name: str, source: str = "") -> CenterSet:
        """This set without the class `name` (trained or enrolled); never the last one."""
        if name not in self.names:
            name = normalize_class_name(name)  # as enrolment stored it
        if name not in self.names:
            raise EnrolmentError("unknown_class", f"no class {name!r} to remove")
        if len(self.names) == 1:
            raise EnrolmentError("last_class", f"{name!r} is the last class; a model needs one")
        keep = [i for i, n in enumerate(self.names) if n != name]
        return dataclasses.replace(
            self,
            names=tuple(self.names[i] for i in keep),
            centers=self.centers[keep],
            thresholds={k: v for k, v in self.thresholds.items() if k != name},
            version=self.version + 1,
            log=(*self.log, log_entry("remove", name, 0, source)),
            embeddings={k: v for k, v in self.embeddings.items() if k != name},
            atypicality={k: v for k, v in self.atypicality.items() if k != name},
        )


def log_entry(
    action: str,
    name: str,
    images: int,
    source: str,
    threshold: float | None = None,
    rule: str | None = None,
) -> dict[str, Any]:
    """One line of the enrolment log (the ONNX `enrolment` metadata and the centers file)."""
    entry: dict[str, Any] = {
        "action": action,
        "class": name,
        "images": images,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
    }
    if rule is not None:
        entry |= {"threshold": threshold, "threshold_rule": rule}
    return entry


# --------------------------------------------------------------------------- the file


def centers_file_for(model: str | Path) -> Path:
    """Where a model's enrolled centers live: beside it, `<model>.centers.npz`."""
    model = Path(model)
    return model.with_name(model.name + CENTERS_FILE_SUFFIX)


def encode_center_set(centers: CenterSet) -> bytes:
    """The .npz bytes of a CenterSet: arrays `centers`, `embeddings_<i>` and
    `atypicality_<i>`, and `meta` (JSON: format, model sha256, distance, names, thresholds,
    version, log). A file without `atypicality_<i>` (written before it existed) reads as
    zeros."""
    enrolled = list(centers.embeddings)
    meta = {
        "format": CENTERS_FILE_FORMAT,
        "model_sha256": centers.model_sha256,
        "distance": centers.distance,
        "names": list(centers.names),
        "thresholds": centers.thresholds,
        "version": centers.version,
        "log": list(centers.log),
        "enrolled": enrolled,
    }
    arrays = {f"embeddings_{i}": centers.embeddings[name] for i, name in enumerate(enrolled)}
    arrays |= {f"atypicality_{i}": centers.atypicality_of(n) for i, n in enumerate(enrolled)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), centers=centers.centers, **arrays)
    return buffer.getvalue()


class _Invalid(ValueError):
    """What is wrong with a centers file's content (decode_center_set says which file)."""


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise _Invalid(message)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _float_array(npz: Any, key: str, ndim: int) -> np.ndarray:
    """`npz[key]` as float32 when it is a finite real array of `ndim` dimensions."""
    _need(key in npz.files, f"no array {key!r}")
    array = npz[key]
    _need(
        array.ndim == ndim and array.dtype.kind in "fiu",
        f"{key!r} is a {array.dtype} array of shape {array.shape}, not {ndim}-D numbers",
    )
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    _need(bool(np.isfinite(array).all()), f"{key!r} holds values that are not finite")
    return array


def _checked_meta(meta: Any) -> dict[str, Any]:
    """`meta` when it has every key of `encode_center_set`'s, each of its type."""
    _need(isinstance(meta, dict), f"its meta is a JSON {type(meta).__name__}, not an object")
    _need(
        meta.get("format") == CENTERS_FILE_FORMAT,
        f"format {meta.get('format')!r}, not {CENTERS_FILE_FORMAT}",
    )
    types = {
        "model_sha256": str,
        "distance": str,
        "names": list,
        "thresholds": dict,
        "version": int,
        "log": list,
        "enrolled": list,
    }
    for key, kind in types.items():
        _need(key in meta, f"its meta has no {key!r}")
        value = meta[key]
        _need(
            isinstance(value, kind) and not isinstance(value, bool),
            f"its meta's {key!r} is {type(value).__name__}, not {kind.__name__}",
        )
    names, enrolled = meta["names"], meta["enrolled"]
    _need(
        bool(names) and all(isinstance(n, str) and n for n in names),
        "its class names are not all non-empty strings",
    )
    _need(len(set(names)) == len(names), "its class names repeat")
    _need(
        all(isinstance(n, str) for n in enrolled)
        and len(set(enrolled)) == len(enrolled)
        and set(enrolled) <= set(names),
        "its enrolled classes are not among its names",
    )
    for name, value in meta["thresholds"].items():
        _need(name in names, f"a threshold for {name!r}, which is not one of its classes")
        _need(_is_number(value), f"the threshold of {name!r} is {value!r}, not a finite number")
    _need(meta["version"] >= 0, f"version {meta['version']}")
    _need(all(isinstance(entry, dict) for entry in meta["log"]), "its log is not of objects")
    return meta


def decode_center_set(data: bytes, source: str) -> CenterSet:
    """A CenterSet from `encode_center_set`'s bytes, its whole structure checked: meta an
    object of the expected keys and types, class names strings, centers a finite (C, D)
    array of one row per name, thresholds finite numbers of known classes, each enrolled
    class's embeddings a finite (n, D) array and its atypicality finite (n,). UserError
    naming `source` (one line) when anything is not so."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            _need("meta" in npz.files, "no 'meta' entry")
            raw = npz["meta"]
            _need(raw.ndim == 0 and raw.dtype.kind == "U", "its meta is not a JSON string")
            meta = _checked_meta(json.loads(str(raw)))
            names = meta["names"]
            centers = _float_array(npz, "centers", 2)
            _need(
                centers.shape[0] == len(names) and centers.shape[1] > 0,
                f"centers of shape {centers.shape} for {len(names)} classes",
            )
            dim = centers.shape[1]
            embeddings, atypicality = {}, {}
            for i, name in enumerate(meta["enrolled"]):
                own = _float_array(npz, f"embeddings_{i}", 2)
                _need(
                    len(own) > 0 and own.shape[1] == dim,
                    f"'embeddings_{i}' has shape {own.shape}; the centers' dim is {dim}",
                )
                embeddings[name] = own
                if f"atypicality_{i}" in npz.files:
                    atypicality[name] = _float_array(npz, f"atypicality_{i}", 1)
                    _need(
                        len(atypicality[name]) == len(own),
                        f"'atypicality_{i}' has {len(atypicality[name])} values for "
                        f"{len(own)} embeddings",
                    )
            return CenterSet(
                names=tuple(names),
                centers=centers,
                thresholds={k: float(v) for k, v in meta["thresholds"].items()},
                version=meta["version"],
                distance=meta["distance"],
                model_sha256=meta["model_sha256"],
                log=tuple(meta["log"]),
                embeddings=embeddings,
                atypicality=atypicality,
            )
    except (
        ValueError,
        KeyError,
        TypeError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        RecursionError,
    ) as e:
        raise UserError(f"{source} is not a readable centers file ({one_line(e)})") from None


def one_line(error: BaseException) -> str:
    """An exception's words on one line, at most 200 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_for_model(centers: CenterSet, sha256: str, info: ModelInfo, source: str) -> CenterSet:
    """`centers` when they belong to this model (its sha256, score kind and dim), scored as
    the model's format scores."""
    if centers.model_sha256 != sha256:
        raise UserError(
            f"{source} holds centers for another model (sha256 {centers.model_sha256[:12]}..., "
            f"this model is {sha256[:12]}...): enrolled centers only apply to the model they "
            "were computed with; move the file away or serve its model"
        )
    if centers.distance != info.score_kind or centers.centers.shape[1:] != (info.embedding_dim,):
        raise UserError(
            f"{source} holds {centers.distance} centers of shape {centers.centers.shape}; "
            f"the model scores by {info.score_kind} and has dim {info.embedding_dim}"
        )
    return dataclasses.replace(centers, true_distances=info.true_distances)


class CentersFile:
    """A model's centers file: read, locked read-modify-write, and change detection.

    Writers (in any process) take an exclusive flock on `<file>.lock` around re-reading the
    file, changing it and writing it back, so two enrolments never lose one another. The
    file is replaced by rename (fileio.atomic_write, fsync'd, then the folder fsync'd), so
    a reader never sees a torn file and needs no lock; `signature` (inode, size, mtime) is
    one os.stat that tells a reader the file changed."""

    def __init__(
        self, path: str | Path, sha256: str, info: ModelInfo, name: str | None = None
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.sha256, self.info = sha256, info
        self.name = name or str(self.path)  # how messages name it (a server: the file name)

    def signature(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime_ns) of the file, None when there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self) -> CenterSet | None:
        """The file's centers (checked against the model), None when there is no file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UserError(f"cannot read {self.name}: {e.strerror}") from None
        return check_for_model(decode_center_set(data, self.name), self.sha256,
                               self.info, self.name)  # fmt: skip

    def write(self, centers: CenterSet) -> None:
        data = encode_center_set(centers)
        atomic_write(self.path, lambda tmp: tmp.write_bytes(data))
        fsync_folder(self.path.parent)  # the rename itself survives a power cut

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock held against every other writer, in this process or another."""
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def update(self, base: CenterSet, change: Callable[[CenterSet], CenterSet]) -> CenterSet:
        """Under the lock: the file's centers (or `base` when there is no file yet), changed
        by `change`, written back; returns what was written. A refused change writes nothing."""
        with self.locked():
            current = self.read() or base
            changed = change(current)
            self.write(changed)
            return changed


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- scoring with it


@dataclass(frozen=True)
class CentersSnapshot:
    """The classes a model answers with, as one immutable value: a `CenterSet` and the
    model's metadata with these classes and thresholds. The service swaps one in per
    enrolment; the scorer answers with one read from a centers file."""

    centers: CenterSet
    info: ModelInfo  # the model's metadata with these classes and thresholds

    @classmethod
    def of(cls, centers: CenterSet, base: ModelInfo) -> CentersSnapshot:
        return cls(centers, centers.model_info(base))

    @property
    def names(self) -> list[str]:
        return self.info.class_names

    @property
    def version(self) -> int:
        return self.centers.version

    @functools.cached_property
    def max_embedding_norm(self) -> float:
        """The largest embedding norm scored against these centers without overflow:
        ‖e‖² − 2·e·c + ‖c‖² stays below float32's max/4 when ‖e‖ + ‖c‖ is below half its
        square root (what /v1/distances accepts)."""
        c = self.centers.centers.astype(np.float64)
        largest = float(np.sqrt((c**2).sum(1).max(initial=0.0)))
        return 0.5 * float(np.sqrt(np.finfo(np.float32).max)) - largest

    def scores(
        self, embeddings: np.ndarray, atypicality: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """float32 (N, D) -> distances (N, C), labels, min_distances, unknown_scores (N,);
        the images' `atypicality` (N,) is part of the unknown score (None, for bare vectors:
        none)."""
        return self.centers.scores(embeddings, atypicality)

    def unknown(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """True where an image's unknown score exceeds its nearest class's threshold."""
        return self.info.unknown(outputs["unknown_scores"], outputs["labels"])


class ModelWithCenters:
    """An opened model (runtime.OnnxModel) that answers with a `CentersSnapshot` instead
    of its file's own centers: the graph gives the embeddings (and atypicality); distances,
    labels and min distances are recomputed from them. What the scorer reads of a model:
    `path`, `info`, `image_size`, `runtime`, `decode`, `run`, `run_batched`, `unknown`."""

    def __init__(self, model: Any, centers: CenterSet) -> None:
        self.model = model
        self.snapshot = CentersSnapshot.of(centers, model.info)
        self.info = self.snapshot.info
        self.path = model.path
        self.image_size = model.image_size
        self.decode = model.decode
        self.runtime = model.runtime

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.model.run(images)
        return {**out, **self.snapshot.scores(out["embeddings"], out["atypicality"])}

    def run_batched(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        return run_batched(self.run, images, batch_size)

    def unknown(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.snapshot.unknown(outputs)  # on unknown_scores, as the graph flags


def apply_centers_file(model: Any, path: str | Path) -> ModelWithCenters:
    """`model` answering with the centers a service persisted at `path` (UserError when the
    file is missing or belongs to another model)."""
    stored = CentersFile(path, sha256_file(model.path), model.info).read()
    if stored is None:
        raise UserError(f"centers file not found: {path}")
    return ModelWithCenters(model, stored)
