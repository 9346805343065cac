"""`center-embed export | verify | inspect`: parse arguments, call export's functions.

Nothing heavy is imported at module level: `center-embed inspect` needs onnxruntime only,
and torch is imported inside `run_export` (and `run_verify --checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from center_embed.cli.common import (
    add_checkpoint_argument,
    add_data_argument,
    add_model_argument,
    add_overwrite_argument,
    add_runtime_arguments,
    add_split_argument,
    add_threads_argument,
    refuse_existing,
    runtime_options,
)
from center_embed.contract import (
    DEFAULT_ATYPICALITY_QUANTILE,
    DEFAULT_UNKNOWN_SCORE,
    SCORE_DISTANCE_KIND,
    UNKNOWN_SCORE_KINDS,
)
from center_embed.errors import UserError
from center_embed.fileio import atomic_write_text

if TYPE_CHECKING:
    from center_embed.runtime import OnnxModel

# --distance (format 1) named the per-center score; the unknown score it meant
LEGACY_DISTANCE = {kind: score for score, kind in SCORE_DISTANCE_KIND.items()}

# --------------------------------------------------------------------------- export


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--out", required=True, help="the ONNX file to write, e.g. model.onnx")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--int8", action="store_true", help="static int8 quantization (QDQ), for CPU serving"
    )
    precision.add_argument("--fp16", action="store_true", help="float16 weights, for GPU serving")
    p.add_argument(
        "--calibration-data", metavar="DATA",
        help="a dataset whose test split calibrates the unknown threshold "
        "(default: the run's validation split)",
    )  # fmt: skip
    p.add_argument(
        "--threshold-quantile", "--quantile", type=float, default=0.95, dest="quantile",
        metavar="Q",
        help="the unknown threshold: the share of correctly classified held-out images whose "
        "unknown score lies under it (default 0.95; --quantile is its old name)",
    )  # fmt: skip
    p.add_argument(
        "--unknown-score", choices=sorted(UNKNOWN_SCORE_KINDS), default=DEFAULT_UNKNOWN_SCORE,
        help="the formula of the `unknown_scores` output (default %(default)s: min over "
        "centers of ‖e − c‖² − ‖e‖², plus the atypicality; it separates unknown images better "
        "than the squared distance; docs/benchmarks.md). `distances` are ‖e − c‖² either way",
    )  # fmt: skip
    p.add_argument("--distance", choices=sorted(LEGACY_DISTANCE), help=argparse.SUPPRESS)
    atypicality = p.add_mutually_exclusive_group()
    atypicality.add_argument(
        "--atypicality-quantile", type=float, metavar="Q",
        help=f"the share of training images whose atypicality is 0 (default "
        f"{DEFAULT_ATYPICALITY_QUANTILE}): the `atypicality` output, a part of the unknown "
        "score, grows for images whose low-level feature statistics lie beyond the training "
        "images' (docs/export.md)",
    )  # fmt: skip
    atypicality.add_argument(
        "--no-atypicality", action="store_true",
        help="export without the `atypicality` output (the unknown score from the embedding "
        "alone)",
    )  # fmt: skip
    add_data_argument(p, default="the run's, as the checkpoint records it; give it if it moved")
    p.add_argument("--no-verify", action="store_true", help="skip the checker and parity checks")
    p.add_argument(
        "--triton-repo", metavar="DIR",
        help="also write the model as a Triton model repository: DIR/center_embed/config.pbtxt "
        "and DIR/center_embed/1/model.onnx",
    )  # fmt: skip
    add_triton_options(p)
    add_overwrite_argument(p)


def run_export(args: argparse.Namespace) -> int:
    from center_embed.export.onnx_export import export_checkpoint

    if not Path(args.out).is_dir():  # a folder gets export's own message
        refuse_existing(args.out, args.overwrite)
    if args.triton_repo:
        refuse_existing(_triton_model_folder(args.triton_repo), args.overwrite)
    from center_embed.export.atypicality import AtypicalityOptions

    atypicality = AtypicalityOptions(
        enabled=not args.no_atypicality,
        quantile=DEFAULT_ATYPICALITY_QUANTILE
        if args.atypicality_quantile is None
        else args.atypicality_quantile,
    )
    unknown_score = args.unknown_score
    if args.distance:  # the option of format-1 exports: what the unknown score was
        unknown_score = LEGACY_DISTANCE[args.distance]
        print(f"--distance is deprecated: distances are always ‖e − c‖²; this exports "
              f"--unknown-score {unknown_score}", file=sys.stderr)  # fmt: skip
    path = export_checkpoint(
        args.checkpoint,
        args.out,
        int8=args.int8,
        fp16=args.fp16,
        calibration_data=args.calibration_data,
        verify=not args.no_verify,
        quantile=args.quantile,
        data=args.data,
        unknown_score=unknown_score,
        atypicality=atypicality,
        log=print,
    )
    info = _open_model(path).info
    print(f"wrote {path} ({info.precision}, {format_size(path.stat().st_size)}, "
          f"{plural(info.num_classes, 'class')}, "
          f"unknown threshold {format_optional_number(info.unknown_threshold)})")  # fmt: skip
    if args.triton_repo:
        _write_triton(path, args.triton_repo, args)
    return 0


# --------------------------------------------------------------------------- triton


def add_triton_options(p: argparse.ArgumentParser) -> None:
    """The Triton model configuration's options (export --triton-repo and triton)."""
    p.add_argument(
        "--triton-max-batch", type=int, default=64, metavar="N",
        help="max_batch_size, the largest batch dynamic batching forms (default 64)",
    )  # fmt: skip
    p.add_argument(
        "--triton-instances", type=int, default=1, metavar="N",
        help="model instances (onnxruntime sessions) Triton runs (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--triton-gpu", action="store_true",
        help="GPU instances (the onnxruntime backend's CUDA provider) instead of CPU ones",
    )  # fmt: skip
    p.add_argument(
        "--triton-tensorrt", choices=("fp16", "fp32"),
        help="with --triton-gpu: the TensorRT execution accelerator at this precision",
    )  # fmt: skip


def add_triton_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the model repository to write")
    add_triton_options(p)
    add_overwrite_argument(p)


def run_triton(args: argparse.Namespace) -> int:
    refuse_existing(_triton_model_folder(args.out), args.overwrite)
    _open_model(args.model)  # a center-embed model, readable, before anything is written
    _write_triton(Path(args.model), args.out, args)
    return 0


def _triton_model_folder(repository: str) -> Path:
    """The folder of ours in a Triton repository (other models there are left alone)."""
    from center_embed.contract import PROTOCOL_MODEL_NAME

    return Path(repository) / PROTOCOL_MODEL_NAME


def _write_triton(model: Path, repository: str, args: argparse.Namespace) -> None:
    from center_embed.export.triton import TritonOptions, write_triton_repository

    options = TritonOptions(
        max_batch_size=args.triton_max_batch,
        instances=args.triton_instances,
        device="gpu" if args.triton_gpu else "cpu",
        tensorrt=args.triton_tensorrt,
    )
    folder = write_triton_repository(model, repository, options)
    print(f"wrote the Triton model repository {repository}: {folder.name}/config.pbtxt and "
          f"{folder.name}/<version>/model.onnx ({options.device}, max batch "
          f"{options.max_batch_size})")  # fmt: skip


# --------------------------------------------------------------------------- verify


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_data_argument(p, default="the one the model was trained on")
    add_split_argument(p)
    p.add_argument(
        "--checkpoint",
        help="also evaluate this checkpoint with torch (fp32, no TTA) and compare",
    )
    p.add_argument(
        "--tolerance", type=float,
        help="largest accuracy difference from the checkpoint, in points "
        "(default: 0.1, or 0.5 for int8 models)",
    )  # fmt: skip
    add_threads_argument(p)
    add_runtime_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    add_overwrite_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_verify(args: argparse.Namespace) -> int:
    from center_embed.export.verify import compare_with_checkpoint, split_accuracy

    refuse_existing(args.json, args.overwrite)
    result: dict[str, Any] = split_accuracy(
        args.model, args.data, args.split, runtime_options(args), progress=not args.no_progress,
    )  # fmt: skip
    runtime = result["runtime"]
    print(f"{result['split']} split of {result['data']} ({result['images']} images), "
          f"{result['precision']} file on {runtime['runtime']} {runtime['precision']} "
          f"({result['provider']}; {runtime['reason']})")  # fmt: skip
    print(f"  nearest-center accuracy  {result['nearest_center_accuracy']:.4f}")
    if "unknown_rate" in result:
        print(f"  flagged unknown          {result['unknown_rate']:.4f}")
    print(f"  images/s                 {result['images_per_second']:.0f}")
    for line in format_enrolment(describe_file(args.model).get("enrolment")):
        print(line)
    status = 0 if "parity" not in result else print_parity(result["parity"])
    if args.checkpoint:
        print(f"evaluating {args.checkpoint} with torch to compare ...", file=sys.stderr)
        result.update(compare_with_checkpoint(result, args.checkpoint, args.data))
        tolerance = args.tolerance
        if tolerance is None:
            tolerance = 0.5 if result["precision"] == "int8" else 0.1
        diff = result["difference_points"]
        result["tolerance_points"] = tolerance
        print(f"  torch fp32 (checkpoint)  {result['torch_nearest_center_accuracy']:.4f}  "
              f"difference {diff:+.2f} points (tolerance {tolerance:g})")  # fmt: skip
        if abs(diff) > tolerance:
            print("FAILED: the model's accuracy differs from the checkpoint's")
            status = 1
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return status


def print_parity(parity: dict[str, Any]) -> int:
    """The runtime's agreement with onnxruntime; 1 when outside RUNTIME_TOLERANCES."""
    tol = parity["tolerances"]
    print(f"  against {parity['reference']} (accuracy {parity['reference_accuracy']:.4f}):")
    print(f"    label agreement        {parity['label_agreement']:.4f} (at least "
          f"{tol['label_agreement']:g})")  # fmt: skip
    print(f"    distances error        {parity['distances']:.4f} of the largest (at most "
          f"{tol['distances']:g}); embeddings {parity['embeddings']:.4f}; unknown scores "
          f"{parity['unknown_scores']:.4f}, p99 {parity['unknown_score_p99']:.4f} of the "
          f"image's largest distance")  # fmt: skip
    print(f"    atypicality error      {parity['atypicality']:.4f} of the largest distance (at "
          f"most {tol['distances']:g}); above 0 on {parity['atypical_share']:.2%} of the images "
          f"(reference {parity['atypical_share_reference']:.2%})")  # fmt: skip
    if "unknown_agreement" in parity:
        print(f"    unknown flags agree    {parity['unknown_agreement']:.4f} (reference rate "
              f"{parity['unknown_rate_reference']:.4f}; at least "
              f"{tol['unknown_agreement']:g} for the threshold to hold)")  # fmt: skip
    if parity["passed"]:
        return 0
    print("FAILED: this runtime/precision disagrees with onnxruntime beyond the tolerances")
    return 1


# --------------------------------------------------------------------------- inspect


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print every metadata key as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    from center_embed.runtime import describe

    model = _open_model(args.model)
    meta = describe(model.info)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(format_model_summary(model, meta))
    return 0


def format_model_summary(model: OnnxModel, meta: dict[str, Any]) -> str:
    """An ONNX model in a screenful: inputs, outputs, threshold, provenance."""
    info = model.info
    h, w = info.input_size
    training = meta.get("training", {})
    calibration = meta.get("unknown_threshold_calibration", {})
    lines = [
        f"{model.path}  ({format_size(Path(model.path).stat().st_size)})",
        f"  format          {meta.get('format_version')}  precision {info.precision}  "
        f"center-embed {meta.get('package_version')}",
        f"  input           images uint8 [N, {h}, {w}, 3] RGB, {meta.get('resize', '')}",
        f"  normalisation   mean {info.mean}  std {info.std} (of pixels/255)",
        f"  outputs         {format_outputs(model)}",
        f"  {plural(info.num_classes, 'class'):<16}{', '.join(info.class_names[:20])}"
        + (" ..." if info.num_classes > 20 else ""),
        f"  unknown above   {format_optional_number(info.unknown_threshold)} "
        f"(q={calibration.get('quantile')} of {calibration.get('correct')} correct "
        f"{calibration.get('split')} images)",
    ]
    atypicality = meta.get("atypicality")
    if isinstance(atypicality, dict):
        lines.append(
            f"  atypicality     0 for {atypicality.get('quantile')} of "
            f"{atypicality.get('norm_images')} training images (Gaussians of "
            f"{', '.join(atypicality.get('layers', []))}, fitted on "
            f"{atypicality.get('fit_images')}); part of the unknown score"
        )
    check = meta.get("self_check")
    if isinstance(check, dict):
        lines.append(f"  self-check      {check.get('images')} held-out images with the answers "
                     f"of onnxruntime {info.precision}: run when another runtime opens the "
                     "file")  # fmt: skip
    loss = meta.get("precision_loss")
    if isinstance(loss, dict) and "accuracy_drop_points" in loss:
        lines.append(f"  {info.precision} vs fp32    {loss.get('summary')}")
    if info.class_thresholds:
        per_class = ", ".join(f"{k} {v:.3g}" for k, v in list(info.class_thresholds.items())[:10])
        lines.append(f"  per class       {per_class}")
    if training:
        val = training.get("val", {}).get("nearest_center_accuracy")
        test = training.get("test", {}).get("nearest_center_accuracy")
        lines.append(
            f"  training        update {training.get('update')}, λ {training.get('center_weight')}"
            f", α {training.get('alpha')}, {training.get('epochs')} epochs; nearest-center "
            f"accuracy val {format_optional_number(val)}, test {format_optional_number(test)}"
        )
    lines += format_enrolment(meta.get("enrolment"))
    exporter = meta.get("exporter")
    if exporter:
        lines.append(
            f"  exported by     torch {exporter.get('torch')} ({exporter.get('mode')}, "
            f"opset {exporter.get('opset')})"
        )
    lines.append(format_runtime_choice(info.precision))
    return "\n".join(lines)


def format_outputs(model: OnnxModel) -> str:
    """The outputs a file computes, with what its distances and unknown score are."""
    info = model.info
    extra = ", atypicality [N]" * model.has_atypicality
    if info.format_version == 1:  # its distances are its score, atypicality included
        kind = info.distance + (" + atypicality" * model.has_atypicality)
        score = "the min distance (format 1)"
    else:
        kind = "squared Euclidean, >= 0"
        score = f"unknown_scores [N]: {UNKNOWN_SCORE_KINDS[info.unknown_score]}"
    return (f"embeddings [N, {info.embedding_dim}], distances [N, {info.num_classes}] "
            f"({kind}), labels [N], min_distances [N]{extra}; {score}")  # fmt: skip


def format_enrolment(log: Any, last: int = 10) -> list[str]:
    """The enrolment log (`center-embed enroll`, PUT/DELETE /v1/centers): its last entries."""
    if not isinstance(log, list) or not log:
        return []
    lines = [f"  enrolment       {plural(len(log), 'change')} since training"
             + (f" (the last {last})" if len(log) > last else "")]  # fmt: skip
    for entry in log[-last:]:
        images = f", {plural(entry.get('images', 0), 'image')}" if entry.get("images") else ""
        lines.append(f"    {entry.get('time', '')}  {entry.get('action', '')} "
                     f"{entry.get('class', '')}{images}  ({entry.get('source', '')})")  # fmt: skip
    return lines


def format_runtime_choice(file_precision: str) -> str:
    """What `--runtime auto --precision auto` runs this file with here, and why."""
    from center_embed.runtime import choose_runtime, installed_runtimes

    installed = ", ".join(installed_runtimes()) or "none"
    try:
        choice = choose_runtime(file_precision=file_precision, device="cpu")
    except UserError as e:
        return f"  runtime auto    cannot run here: {e} (installed: {installed})"
    return (f"  runtime auto    {choice.runtime} {choice.precision} ({choice.reason}; "
            f"installed: {installed})")  # fmt: skip


# --------------------------------------------------------------------------- helpers


def describe_file(path: str | Path) -> dict[str, Any]:
    """A model file's metadata as plain values, read without opening a runtime."""
    from center_embed.contract import our_metadata, read_metadata_props

    out: dict[str, Any] = {}
    for key, value in our_metadata(read_metadata_props(path)).items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _open_model(path: str | Path) -> OnnxModel:
    from center_embed.runtime import OnnxModel, RuntimeOptions

    if not Path(path).is_file():
        raise UserError(f"model not found: {path}")
    return OnnxModel(path, RuntimeOptions(device="cpu"))


def format_size(n_bytes: int) -> str:
    """A file size a person reads: 812 B, 45.3 kB, 1.2 MB, 2.0 GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def plural(n: int, noun: str) -> str:
    """`1 class`, `3 classes`, `1 image`, `2 images`."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x", "ch", "sh")) else f"{n} {noun}s"


def format_optional_number(value: float | None) -> str:
    """A threshold or an accuracy in 4 significant digits, or "none" where there is none."""
    return "none" if value is None else f"{value:.4g}"
