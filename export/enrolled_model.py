"""A model with enrolled classes, as a new ONNX file: `center-embed enroll`'s writer.

The source file is read and never modified. The copy differs from it in what the classes
are and nothing else: the `centers` initializer (C', D) (in the source's dtype), the static
width of the `distances` output (C'), the metadata class_names, num_classes,
class_thresholds and the `enrolment` log. Shape hints in value_info may name C, so they are
dropped (they are optional; onnxruntime infers shapes itself). The file is written under a
temporary name (fileio.atomic_path), checked there (onnx.checker with shape inference, and
the graph's own distances against `contract.distances` of its embeddings and the new
centers, on random images), and renamed only when both pass.

Imports onnx (the `train` extra), never torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from center_embed.contract import CENTERS_INITIALIZER, OUTPUT_NAMES, center_scores, set_metadata
from center_embed.enrolment import CenterSet
from center_embed.errors import UserError
from center_embed.export.verify import check_file, relative_error
from center_embed.fileio import atomic_path
from center_embed.runtime import OnnxModel, RuntimeOptions

CHECK_IMAGES = 4
CHECK_TOLERANCE = 1e-3  # relative to the largest distance, as the service's warm-up allows


def write_enrolled_model(source: str | Path, centers: CenterSet, out: str | Path) -> Path:
    """`source` with the classes of `centers`, written to `out` (never `source` itself)."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the input model: enroll never modifies its input")
    proto = onnx.load(str(source))
    replace_centers(proto, centers)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        check_file(tmp)
        check_distances(tmp, centers)
    return out


def replace_centers(proto: onnx.ModelProto, centers: CenterSet) -> None:
    """Set the graph's centers, the distances' width and the class metadata, in place."""
    graph = proto.graph
    found = [i for i, t in enumerate(graph.initializer) if t.name == CENTERS_INITIALIZER]
    if not found:
        raise UserError(f"the model has no {CENTERS_INITIALIZER!r} initializer")
    old = graph.initializer[found[0]]
    dtype = numpy_helper.to_array(old).dtype  # fp16 models keep fp16 centers
    graph.initializer[found[0]].CopyFrom(
        numpy_helper.from_array(centers.centers.astype(dtype), CENTERS_INITIALIZER)
    )
    distances_output = next(o for o in graph.output if o.name == OUTPUT_NAMES[1])
    dims = distances_output.type.tensor_type.shape.dim
    if len(dims) == 2:
        dims[1].Clear()
        dims[1].dim_value = len(centers.names)
    del graph.value_info[:]
    # The self-check recorded the file's own classes; an enrolled copy has none (it is run
    # as today's files: no check, whatever the runtime).
    kept = [p for p in proto.metadata_props if p.key != "center_embed.self_check"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    values = {
        "class_names": list(centers.names),
        "num_classes": len(centers.names),
        "class_thresholds": {
            n: centers.thresholds[n] for n in centers.names if n in centers.thresholds
        },  # fmt: skip
        "enrolment": list(centers.log),
    }
    set_metadata(proto, values)


def check_distances(path: Path, centers: CenterSet) -> None:
    """The written graph's distances and unknown scores are the contract's for the new
    centers."""
    model = OnnxModel(path, RuntimeOptions(device="cpu"))
    h, w = model.info.input_size
    images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, h, w, 3), dtype=np.uint8)
    out = model.run(images)
    info = model.info
    expected = center_scores(out["embeddings"], centers.centers, info.score_kind,
                             info.true_distances, out["atypicality"])  # fmt: skip
    ours = expected["distances"]
    error = max(relative_error(out["distances"], ours.astype(np.float64)),
                relative_error(out["unknown_scores"], expected["unknown_scores"]))  # fmt: skip
    if out["distances"].shape != ours.shape or error > CHECK_TOLERANCE:
        raise UserError(
            f"the enrolled model's distances differ from the new centers' ({error:.2e} "
            "relative): the graph does not read its centers initializer as expected"
        )
    if model.info.class_names != list(centers.names):
        raise UserError("the enrolled model's class names were not written")
