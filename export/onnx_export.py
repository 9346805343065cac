"""Checkpoint -> one self-describing ONNX file (model format 2): uint8 pixels in;
embeddings, the distance to every center, the nearest center, its distance and the unknown
score out.

The graph (docs/export.md, "The ONNX contract"):

    images uint8 (N, H, W, 3) -> float (N, 3, H, W), (x − 255·mean) / (255·std)
      -> EmbeddingNet.embed                                   = embeddings     (N, D)
      -> s = ‖c‖² − 2·e·centersᵀ                              the per-center score (N, C)
      -> max(s + ‖e‖², 0) = ‖e − c‖²                          = distances      (N, C)
      -> argmin of s, and the distance there                  = labels, min_distances (N,)
    feature maps of the backbone -> export/atypicality.py     = atypicality    (N,)
      -> min of s, plus the atypicality                      = unknown_scores (N,)

The unknown score's formula is `--unknown-score` (contract.UNKNOWN_SCORE_KINDS; the metadata
key `unknown_score` says which): by default min_distance_minus_norm, the min over centers of
‖c‖² − 2·e·c = ‖e − c‖² − ‖e‖², the nearest-center rule's own decision function, which does
not reward a short embedding (what an image unlike every class gives) and so separates
unknown images far better than the squared distance (min_distance, where s is ‖e − c‖²).
Both pick the same label as the distances do.

The exporter is pinned (TorchScript exporter, opset 20) rather than left to the torch
default, which changes between releases. The centers are passed to the exporter as a
graph input, so constant folding cannot merge them into a transposed anonymous constant;
afterwards that input becomes an initializer named `centers`, which the distance matmul
reads and any client can pull out of the file.

The file is written to a temporary name beside the target (fileio.atomic_path), verified,
calibrated and given its metadata there, and renamed only when all of that succeeded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from center_embed import __version__
from center_embed.contract import (
    ATYPICALITY,
    CENTERS_INITIALIZER,
    DEFAULT_UNKNOWN_SCORE,
    INPUT_NAME,
    MODEL_FORMAT_VERSION,
    OUTPUT_NAMES,
    SCORE_DISTANCE_KIND,
    UNKNOWN_SCORE_KINDS,
    UNKNOWN_SCORES,
    SelfCheck,
    distances,
    set_metadata,
)
from center_embed.data import spread_sample
from center_embed.errors import UserError
from center_embed.export.atypicality import (
    MIN_IMAGES,
    AtypicalityOptions,
    Fitted,
    fit_atypicality,
    fit_on,
    graph_statistics,
    write_into,
)
from center_embed.export.calibrate import calibration_set, unknown_thresholds
from center_embed.export.verify import PARITY_BATCHES, check_file, check_parity
from center_embed.fileio import atomic_path
from center_embed.runtime import OnnxModel, RuntimeOptions
from center_embed.training.checkpoint import Checkpoint, Preprocess

# Opset 20 has a native Gelu: onnxruntime runs it as one kernel between the int8 convs,
# where opset 18's Erf expression cost the int8 model about a quarter of its time.
OPSET = 20
EXPORTER = "torchscript"  # torch.onnx.export(dynamo=False): fast, deterministic, no onnxscript


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    fp16: bool = False,
    calibration_data: str | None = None,
    verify: bool = True,
    quantile: float = 0.95,
    data: str | None = None,
    unknown_score: str = DEFAULT_UNKNOWN_SCORE,
    atypicality: AtypicalityOptions = AtypicalityOptions(),  # noqa: B008 (frozen)
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write `checkpoint` as one verified ONNX model at `out`; return its path.

    int8: static QDQ quantization (uint8 activations, int8 weights) calibrated on training
    images. fp16: float16 weights and activations (for GPU serving; the outputs stay float32).
    calibration_data: a dataset whose test split calibrates the unknown threshold instead of
    the run's validation split. data: where the run's dataset lies now, if it moved.
    verify: onnx.checker and torch/onnxruntime parity on real images (raises on failure).
    unknown_score: the formula of `unknown_scores`, a key of contract.UNKNOWN_SCORE_KINDS.
    atypicality: how the `atypicality` output (export/atypicality.py) is fitted on the run's
    training images (enabled=False: no such output).
    log: a callable receiving progress lines (default: silent).
    """
    say = log or (lambda _: None)
    if int8 and fp16:
        raise UserError("choose at most one of int8 and fp16")
    if unknown_score not in UNKNOWN_SCORE_KINDS:
        raise UserError(f"--unknown-score must be one of {', '.join(UNKNOWN_SCORE_KINDS)}, "
                        f"not {unknown_score!r}")  # fmt: skip
    out = _check_output(Path(out))
    ckpt = Checkpoint.load(checkpoint)
    model, criterion = ckpt.build_model()
    calib = calibration_set(ckpt, data, calibration_data)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    started = time.perf_counter()
    graph = prepare_graph(ckpt, model, criterion.centers, calib, unknown_score, atypicality, say)
    fp32, proto = build_graphs(ckpt, graph, calib, precision)
    say(f"exported the {precision} graph in {time.perf_counter() - started:.1f} s")
    with _write_errors(out), atomic_path(out) as tmp:  # renamed to `out` once all succeeded
        save(proto, tmp)
        shipped = OnnxModel(tmp, RuntimeOptions(device="cpu"))
        meta = {"verification": verified(tmp, shipped, graph, ckpt, calib, say)} if verify else {}
        held_out = shipped.run_batched(calib.held_out.images)
        meta |= threshold_metadata(held_out, calib, shipped.info, quantile)
        meta["self_check"] = self_check_metadata(held_out, calib, shipped.info, meta)
        where = calibration_source(meta["unknown_threshold_calibration"])
        say(f"unknown threshold {meta['unknown_threshold'] or 'none'} ({where}, q={quantile})")
        if precision != "fp32":
            meta["precision_loss"] = compare_with_fp32(fp32, held_out, calib, tmp.parent)
            say(f"{precision} against fp32: {meta['precision_loss']['summary']}")
        set_metadata(proto, meta)
        save(proto, tmp)
        OnnxModel(tmp, RuntimeOptions(device="cpu"))  # the final file opens and its metadata parses
    return out


def verified(path: Path, shipped: OnnxModel, graph, ckpt: Checkpoint, calib, say) -> dict:
    """onnx.checker on the file, then its parity with torch on held-out images (raises
    VerificationFailed beyond the tolerance); the parity figures."""
    check_file(path)
    parity = check_parity(shipped, torch_reference(graph, ckpt.preprocess), calib.held_out.images)
    say(f"parity with torch at batch sizes {list(PARITY_BATCHES)}: {parity['summary']}")
    return parity


@dataclass
class Graph:
    """What the exported graph computes: the network, its centers, the unknown score's
    formula, and the fitted atypicality (None: a file without that output)."""

    model: nn.Module  # EmbeddingNet, eval mode
    centers: torch.Tensor  # (C, D)
    unknown_score: str  # a key of contract.UNKNOWN_SCORE_KINDS
    atypicality: Fitted | None = None

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUT_NAMES) + ([ATYPICALITY] if self.atypicality else [])

    @property
    def score_kind(self) -> str:
        """The per-center score whose min is the unknown score and argmin the label."""
        return SCORE_DISTANCE_KIND[self.unknown_score]

    def min_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,): the unknown score without the atypicality (what scales it)."""
        centers = self.centers.detach().float().cpu().numpy()
        return distances(embeddings, centers, self.score_kind).min(1)


def prepare_graph(
    ckpt: Checkpoint,
    model,
    centers: torch.Tensor,
    calib,
    unknown_score: str = DEFAULT_UNKNOWN_SCORE,
    options: AtypicalityOptions = AtypicalityOptions(),  # noqa: B008 (frozen)
    say: Callable[[str], None] = lambda _: None,
) -> Graph:
    """The graph to export, its atypicality fitted on the run's training images (none,
    and said, when it is not enabled or the run has too few training images)."""
    graph = Graph(model, centers, unknown_score)
    if not options.enabled:
        return graph
    fitted = fit_atypicality(model, calib.train.images, ckpt.preprocess, graph.min_scores,
                             options)  # fmt: skip
    if fitted is None:
        say(f"no atypicality output: {len(calib.train)} training images, {MIN_IMAGES} needed")
    else:
        facts = fitted.facts
        say(f"atypicality fitted on {facts['fit_images']} + {facts['norm_images']} training "
            f"images (gate at q={options.quantile})")  # fmt: skip
    return dataclasses.replace(graph, atypicality=fitted)


def build_graphs(ckpt: Checkpoint, graph: Graph, calib, precision: str):
    """(the fp32 graph, the graph to ship at `precision`), both with the static metadata.

    The fp32 graph is kept beside a reduced-precision one to measure what precision cost.
    """
    fp32 = to_onnx(graph, ckpt.preprocess)
    set_metadata(fp32, static_metadata(ckpt, "fp32", graph))
    if precision == "fp32":
        return fp32, fp32
    if precision == "fp16":
        proto = to_onnx(graph, ckpt.preprocess, fp16=True)
    else:
        from center_embed.export.quantize import INT8_CALIBRATION_IMAGES, quantize_int8

        proto = quantize_int8(copy.deepcopy(fp32), calib.train, INT8_CALIBRATION_IMAGES)
        graph = refit_in_graph(proto, graph, calib.train.images)
    set_metadata(proto, static_metadata(ckpt, precision, graph))
    return fp32, proto


def refit_in_graph(proto, graph: Graph, images: np.ndarray) -> Graph:
    """`graph` with its atypicality refitted on the statistics that `proto` (a quantized
    copy of it) computes itself, written into proto's initializers (export/atypicality.py,
    "in a graph", for why)."""
    if graph.atypicality is None:
        return graph
    statistics = graph_statistics(proto, OUTPUT_NAMES[0])
    fitted = fit_on(statistics, images, graph.min_scores, graph.atypicality.options)
    if fitted is None:  # the same images as the first fit: cannot happen
        raise RuntimeError("the atypicality could not be refitted")
    write_into(proto, fitted.module)
    fitted.facts["fitted_on"] = "this graph's own (quantized) activations"
    return dataclasses.replace(graph, atypicality=fitted)


def compare_with_fp32(fp32, held_out: dict[str, np.ndarray], calib, folder: Path) -> dict[str, Any]:
    """Accuracy of the reduced-precision model against the fp32 graph on the held-out
    images, and how often the two pick the same center."""
    truth = np.asarray(calib.held_out.labels)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fp32-") as scratch:
        save(fp32, Path(scratch) / "fp32.onnx")
        reference = OnnxModel(Path(scratch) / "fp32.onnx", RuntimeOptions(device="cpu"))
        reference_out = reference.run_batched(calib.held_out.images)
    accuracy = float((held_out["labels"] == truth).mean())
    accuracy_fp32 = float((reference_out["labels"] == truth).mean())
    agreement = float((held_out["labels"] == reference_out["labels"]).mean())
    drop = 100 * (accuracy_fp32 - accuracy)
    return {
        "split": calib.description["split"],
        "images": int(len(truth)),
        "nearest_center_accuracy": accuracy,
        "nearest_center_accuracy_fp32": accuracy_fp32,
        "accuracy_drop_points": drop,
        "label_agreement_with_fp32": agreement,
        "summary": f"{calib.description['split']} nearest-center accuracy {accuracy:.4f} "
        f"vs {accuracy_fp32:.4f} (drop {drop:.2f} points), same label on {agreement:.2%}",
    }


# --------------------------------------------------------------------------- the graph


def to_onnx(graph: Graph, preprocess: Preprocess, fp16: bool = False):
    """The exported graph as an onnx.ModelProto, centers as the initializer `centers`."""
    wrapper = ExportGraph(graph, preprocess.mean, preprocess.std, fp16).eval()
    h, w = preprocess.input_size
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    centers = graph.centers.detach().float().cpu().contiguous()  # (C, D)
    buffer = io.BytesIO()
    batch = {0: "N"}
    outputs = graph.output_names
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapper,
            (example, centers),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME, CENTERS_INITIALIZER],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: batch, **{name: batch for name in outputs}},
            do_constant_folding=True,
            export_params=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _centers_to_initializer(proto, centers.numpy())
    proto.doc_string = (
        "center-embed: uint8 images -> embeddings, distances to centers, unknown scores"
    )
    return proto


class ExportGraph(nn.Module):
    """EmbeddingNet.embed with in-graph normalisation, the distances to the centers, the
    unknown score and, when the graph has one, the atypicality (in fp32 whatever the
    network's precision)."""

    def __init__(self, graph: Graph, mean: list[float], std: list[float], fp16: bool = False):
        super().__init__()
        net = copy.deepcopy(graph.model)  # fp16 converts it in place; the caller keeps fp32
        self.net = net.half() if fp16 else net.float()
        self.fp16 = fp16
        self.score_kind = graph.score_kind
        fitted = graph.atypicality
        self.atypicality = copy.deepcopy(fitted.module).float() if fitted else None
        # Pixels stay in 0..255: scaling mean and std saves a multiply per pixel.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor, centers: torch.Tensor):
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        x = (x - self.pixel_mean) / self.pixel_std
        maps = self.net.feature_maps(x.half() if self.fp16 else x)
        e = self.net.embed_maps(maps[-1]).float()  # (N, D)
        # The matmul form: one (N, D) x (D, C) product, never an (N, C, D) difference; the
        # same formulas as contract.center_scores.
        s = centers.pow(2).sum(1)[None, :] - 2 * e @ centers.T  # (N, C): ‖e − c‖² − ‖e‖²
        d = (s + e.pow(2).sum(1, keepdim=True)).clamp_min(0)  # (N, C): ‖e − c‖²
        if self.score_kind == "squared_euclidean":
            s = d
        labels = s.argmin(1)  # (N,): the argmin of the distances too
        min_d = d.gather(1, labels[:, None])[:, 0]  # (N,)
        score = s.amin(1)  # (N,)
        if self.atypicality is None:
            return e, d, labels, min_d, score
        a = self.atypicality(maps)  # (N,)
        return e, d, labels, min_d, score + a, a


def torch_reference(graph: Graph, preprocess: Preprocess):
    """The same graph run by torch in fp32: uint8 (N, H, W, 3) numpy -> numpy outputs."""
    module = ExportGraph(graph, preprocess.mean, preprocess.std).eval()
    centers = graph.centers.detach().float().cpu()
    names = graph.output_names

    @torch.no_grad()
    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        if not images.flags.writeable:  # a memory-mapped split: torch wants its own copy
            images = images.copy()
        values = module(torch.from_numpy(images), centers)
        return {name: v.numpy() for name, v in zip(names, values, strict=True)}

    return run


def _centers_to_initializer(proto, centers: np.ndarray) -> None:
    """Turn the graph input `centers` into an initializer of the same name."""
    graph = proto.graph
    kept = [i for i in graph.input if i.name != CENTERS_INITIALIZER]
    if len(kept) == len(graph.input):
        raise RuntimeError("the exported graph lost its centers input")
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.append(
        numpy_helper.from_array(centers.astype(np.float32), CENTERS_INITIALIZER)
    )


# --------------------------------------------------------------------------- metadata


def static_metadata(ckpt: Checkpoint, precision: str, graph: Graph) -> dict[str, Any]:
    """Everything but the threshold: what the model is, its inputs, and where it came from."""
    pre = ckpt.preprocess
    extra = {"atypicality": graph.atypicality.facts} if graph.atypicality else {}
    return {
        "format_version": str(MODEL_FORMAT_VERSION),
        "class_names": ckpt.class_names,
        "embedding_dim": ckpt.embedding_dim,
        "num_classes": ckpt.num_classes,
        "unknown_score": graph.unknown_score,
        "input_layout": pre.layout,
        "input_size": list(pre.input_size),
        "resize": pre.resize,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "precision": precision,
        "training": training_facts(ckpt),
        "exporter": {"torch": torch.__version__, "mode": EXPORTER, "opset": OPSET},
        "package_version": __version__,
        **extra,
    }


def training_facts(ckpt: Checkpoint) -> dict[str, Any]:
    """Update rule, λ, α, epochs and accuracies, from the checkpoint's config and metrics."""
    loss, metrics = ckpt.config.loss, ckpt.metrics
    facts = {
        "update": loss.update,
        "center_weight": loss.center_weight,
        "alpha": loss.alpha,
        "epochs": ckpt.epoch,
        "steps": ckpt.step,
        "val": _accuracies(metrics.get("val") or {}),
        "test": _accuracies(metrics.get("test") or {}),
        "checkpoint_package_version": ckpt.package_version,
        "data_source": ckpt.data_source,
    }
    if loss.update == "mean":
        facts["decay"] = loss.decay
    if loss.update == "sgd":
        facts["center_lr"] = loss.center_lr
    return facts


def _accuracies(split: dict[str, Any]) -> dict[str, float]:
    keys = ("nearest_center_accuracy", "softmax_accuracy", "precision_at_1", "map_at_r")
    return {k: float(split[k]) for k in keys if k in split}


def calibration_source(facts: dict[str, Any]) -> str:
    """Where the threshold was calibrated, in words: the run's validation split or the test
    split of the --calibration-data folder, with its image count."""
    images = f"{facts['images']} images" if "images" in facts else "no images"
    if facts.get("split") == "validation":
        return f"the run's validation split of {facts.get('source')}, {images}"
    return f"the {facts.get('split')} split of {facts.get('source')}, {images}"


SELF_CHECK_IMAGES = 32  # held-out images stored in the file: 133 KB of metadata at 32x32


def self_check_metadata(
    held_out: dict[str, np.ndarray], calib, info, meta: dict[str, Any]
) -> dict[str, Any]:
    """The file's self-check (contract.SelfCheck): SELF_CHECK_IMAGES held-out images spread
    over the split, and what this graph at its own precision answers for them, its
    thresholds included."""
    index = spread_sample(len(calib.held_out), SELF_CHECK_IMAGES)
    threshold = meta["unknown_threshold"]
    scoped = dataclasses.replace(
        info,
        unknown_threshold=float(threshold) if threshold != "" else None,
        class_thresholds=meta["class_thresholds"] or None,
    )
    labels, scores = held_out["labels"][index], held_out[UNKNOWN_SCORES][index]
    return SelfCheck(
        images=np.asarray(calib.held_out.images[index], np.uint8),
        labels=labels,
        unknown=scoped.unknown(scores, labels),
        min_distances=held_out["min_distances"][index],
        unknown_scores=scores,
    ).to_metadata()


def threshold_metadata(
    held_out: dict[str, np.ndarray], calib, info, quantile: float
) -> dict[str, Any]:
    """Thresholds from the exported model's own unknown scores on the held-out images, so
    that what is calibrated is exactly what the service computes."""
    threshold, per_class, facts = unknown_thresholds(
        held_out[UNKNOWN_SCORES],
        held_out["labels"],
        np.asarray(calib.held_out.labels),
        info.class_names,
        quantile,
    )
    facts = {**calib.description, **facts, "computed_with": f"onnxruntime {info.precision}"}
    return {
        "unknown_threshold": "" if threshold is None else repr(threshold),
        "class_thresholds": per_class,
        "unknown_threshold_calibration": facts,
    }


# --------------------------------------------------------------------------- files


def save(proto, path: Path) -> None:
    """One file, weights inline (a model too big for that is not ours to handle)."""
    onnx.save_model(proto, str(path), save_as_external_data=False)


def _check_output(out: Path) -> Path:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as model.onnx")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write to {out.parent}")
    return out


@contextlib.contextmanager
def _write_errors(out: Path) -> Iterator[None]:
    """An OSError while writing `out` (a full disk, lost rights) as a one-line UserError."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
