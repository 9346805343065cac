"""`center-embed enroll`: new classes (or fewer) in a new ONNX file, without retraining.

    center-embed enroll model.onnx --class zebra zebra_photos/ --out model-v2.onnx
    center-embed enroll model.onnx --from-folder new_classes/ --out model-v2.onnx
    center-embed enroll model.onnx --remove zebra --out model-v3.onnx
    center-embed enroll model.onnx --centers model.onnx.centers.npz --out model-v2.onnx

The input model is never modified. Changes apply in this order: a service's centers file
(--centers: what PUT/DELETE /v1/centers did), then --remove, then --class and
--from-folder. Centers and thresholds: center_embed/enrolment.py; the writer:
center_embed/export/enrolled_model.py (needs the onnx package: extra `enrol`, no torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from center_embed.cli.common import (
    add_batch_size_argument,
    add_model_argument,
    add_overwrite_argument,
    refuse_existing,
)
from center_embed.errors import UserError


def add_enroll_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument(
        "--class", dest="classes", nargs=2, action="append", default=[],
        metavar=("NAME", "DIR"),
        help="enrol the class NAME from the images in DIR (replaces a class of that name); "
        "repeatable",
    )  # fmt: skip
    p.add_argument(
        "--from-folder", metavar="DIR",
        help="enrol every subfolder DIR/<class>/ as a class named after it",
    )  # fmt: skip
    p.add_argument(
        "--remove", action="append", default=[], metavar="NAME",
        help="remove the class NAME (trained or enrolled); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--centers", metavar="FILE",
        help="apply a service's centers file (<model>.centers.npz, written by PUT/DELETE "
        "/v1/centers) to the model first",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="the new ONNX file to write")
    add_batch_size_argument(p, "images per inference call")
    add_overwrite_argument(p)


def run_enroll(args: argparse.Namespace) -> int:
    from center_embed.contract import read_centers
    from center_embed.enrolment import CenterSet, CentersFile
    from center_embed.fileio import sha256_file
    from center_embed.runtime import OnnxModel, RuntimeOptions

    if not (args.classes or args.from_folder or args.remove or args.centers):
        raise UserError("nothing to change: give --class, --from-folder, --remove or --centers")
    refuse_existing(args.out, args.overwrite)
    from center_embed.export.enrolled_model import write_enrolled_model  # onnx: extra enrol

    model = OnnxModel(args.model, RuntimeOptions(device="cpu"))
    sha256 = sha256_file(args.model)
    centers = CenterSet.from_model(model.info, read_centers(args.model), sha256)
    if args.centers:
        stored = CentersFile(args.centers, sha256, model.info).read()
        if stored is None:
            raise UserError(f"centers file not found: {args.centers}")
        centers = stored
        print(f"applied {args.centers} (version {stored.version}, {len(stored.names)} classes)")
    for name in args.remove:
        centers = centers.without_class(name, source="center-embed enroll --remove")
        print(f"removed {name}")
    for name, folder in class_folders(args):
        files = image_files(Path(folder))
        out = run_files(model, files, args.batch_size)
        centers = centers.with_class(
            name, out["embeddings"], info=model.info, source=str(folder),
            atypicality=out["atypicality"],
        )  # fmt: skip
        threshold = centers.thresholds.get(name)
        print(f"enrolled {name} from {len(files)} images in {folder} (unknown threshold "
              f"{'none' if threshold is None else f'{threshold:.4g}'})")  # fmt: skip
    out = write_enrolled_model(args.model, centers, args.out)
    print(f"wrote {out}: {len(centers.names)} classes ({', '.join(centers.names[:20])}"
          f"{' ...' if len(centers.names) > 20 else ''})")  # fmt: skip
    return 0


def class_folders(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(class name, folder) for each --class and each subfolder of --from-folder."""
    from center_embed.enrolment import check_class_name

    pairs = [(name, folder) for name, folder in args.classes]
    if args.from_folder:
        root = Path(args.from_folder)
        if not root.is_dir():
            raise UserError(f"--from-folder {root} is not a folder")
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subfolders:
            raise UserError(f"--from-folder {root} has no <class>/ subfolders")
        pairs += [(p.name, str(p)) for p in subfolders]
    names = [check_class_name(name) for name, _ in pairs]  # all refused before any work
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"class(es) given more than once: {', '.join(repeated)}")
    return pairs


def image_files(folder: Path) -> list[Path]:
    """The images directly in `folder` (by extension), sorted; UserError when none."""
    from center_embed.imageio import image_extensions

    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    extensions = image_extensions()
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in extensions and not p.name.startswith("."))  # fmt: skip
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(extensions)[:6])} ...)")
    return files


def run_files(model, files: list[Path], batch_size: int) -> dict[str, np.ndarray]:
    """The model's outputs for image files (embeddings (n, D), atypicality (n,), ...); an
    undecodable file is a UserError naming it."""
    from center_embed.imageio import ImageDecodeError, ImageFormatError, ImageTooLargeError

    pixels = []
    for path in files:
        try:
            pixels.append(model.decode(path))
        except (ImageDecodeError, ImageFormatError, ImageTooLargeError, OSError) as e:
            raise UserError(f"cannot read the image {path}: {e}") from None
    return model.run_batched(np.stack(pixels), batch_size)
