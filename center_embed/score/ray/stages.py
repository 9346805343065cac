"""The Ray Data stages: what Ray runs in its tasks and actors, one block at a time.

    read_block    Ray task: a block's input rows, and with a GPU the images decoded too
    ScoreBatches  the actor (a callable class): one onnxruntime session, rows out in the
                  local scorer's schema; usable in any Ray Data pipeline on its own
    write_parts   Ray task: each contiguous run of input rows as one part file

Images are decoded by center_embed.score.decode, as in the local scorer: the same pixels
and, for an image that fails, the same error row.

Imports numpy, Pillow, pyarrow and onnxruntime (the last two inside functions); ray only
to fetch a model passed as an ObjectRef; never torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

from center_embed.contract import empty_outputs
from center_embed.fileio import sha256_file
from center_embed.score.decode import decode_batch
from center_embed.score.ray.fs import filesystem, is_uri, read_file_bytes
from center_embed.score.ray.manifest import read_blocks
from center_embed.score.ray.parts import inside, part_name, write_part

if TYPE_CHECKING:
    from center_embed.runtime import RuntimeOptions


def read_block(
    batch: dict, out: str, rows_per_block: int, size: int, covered: list, decode: bool
) -> Any:
    """Ray task: the input rows of the given block numbers, with the images decoded if asked.

    Columns: index, id, path, true_class, and with `decode` image (fixed-size binary,
    size*size*3 bytes; null where the image failed) and error. Rows inside `covered`
    ((first, last) ranges already written) are dropped: that is how --resume skips them.
    """
    import pyarrow as pa

    table = read_blocks(out, np.asarray(batch["block"]).tolist())
    keep = ~inside(table.column("index").to_numpy(), covered)
    table = table.filter(pa.array(keep))
    if not decode:
        return table
    pixels, errors = decode_paths(table.column("path").to_pylist(), size)
    return table.append_column("image", image_column(pixels, errors, size)).append_column(
        "error", pa.array(errors, pa.string())
    )


def decode_paths(paths: list[str], size: int) -> tuple[np.ndarray, list[str | None]]:
    """(uint8 (k, size, size, 3) of the k files that decoded, error or None per path);
    local paths or URIs."""
    from center_embed.imageio import decode_image

    return decode_batch(paths, size, lambda path: decode_image(read_file_bytes(path), size))


def image_column(pixels: np.ndarray, errors: list[str | None], size: int) -> Any:
    """The decoded images as a fixed-size binary column (size*size*3 bytes a row), one row
    per error slot: the next image where the error is None, else null."""
    import pyarrow as pa

    ok = np.array([e is None for e in errors], bool)
    rows = np.zeros((len(errors), size, size, 3), np.uint8)
    rows[ok] = pixels
    validity = None if ok.all() else pa.py_buffer(np.packbits(ok, bitorder="little"))
    kind = pa.binary(size * size * 3)
    return pa.Array.from_buffers(kind, len(errors), [validity, pa.py_buffer(rows)])


def _pixels(images: Any, size: int) -> np.ndarray:
    """A fixed-size binary array as uint8 (n, size, size, 3), null slots included."""
    data = np.frombuffer(images.buffers()[1], np.uint8)
    width = size * size * 3
    start = images.offset * width
    return data[start : start + len(images) * width].reshape(-1, size, size, 3)


class ScoreBatches:
    """A callable class for `Dataset.map_batches`: image rows in, scored rows out.

    One onnxruntime session per instance (Ray makes one instance per actor). A batch holds
    either `bytes` (as `ray.data.read_binary_files(..., include_paths=True)` gives: decoded
    here) or `image` and `error` (decoded upstream by `read_block`) or neither (the files
    are read and decoded here), plus `path` and optionally `id` (default: the path) and
    `true_class`. The result is a pyarrow Table in the local scorer's schema
    (center_embed.score.output.make_schema), so `ds.write_parquet(...)` writes the same
    columns.

        ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
        ds = ds.map_batches(ScoreBatches, fn_constructor_kwargs={"model": "model.onnx"},
                            concurrency=8)
        ds.write_parquet("s3://bucket/scores/")

    model: a path (local, or a URI pyarrow reads), the model file's bytes, or an ObjectRef
    of those bytes (`ray.put`: the engine's way, so the pipeline Ray ships stays small).
    options: its device and threads are used (default: cpu, 1 thread); onnxruntime runs
    the file at its own precision.
    """

    def __init__(self, model: str | bytes | Any, options: RuntimeOptions | None = None,
                 schema: Any = None, source: dict | None = None) -> None:  # fmt: skip
        from center_embed.runtime import OnnxModel, RuntimeOptions

        options = options or RuntimeOptions(device="cpu", threads=1)
        self.model = OnnxModel(
            _local_model(model), RuntimeOptions(device=options.device, threads=options.threads)
        )
        self.size = self.model.info.input_size[0]
        self.schema = schema if schema is not None else model_schema(self.model, source)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
        paths = table.column("path").to_pylist()
        pixels, errors = self._decoded(table, paths)
        outputs = self.model.run(pixels) if len(pixels) else empty_outputs(
            self.model.info.num_classes, self.model.info.embedding_dim
        )  # fmt: skip
        return self._rows(table, paths, errors, outputs)

    def _decoded(self, table: Any, paths: list) -> tuple[np.ndarray, list[str | None]]:
        """(uint8 (k, H, W, 3) of the k images that decoded, error or None per row)."""
        from center_embed.imageio import decode_image

        if "image" in table.column_names:  # decoded by read_block tasks
            errors = table.column("error").to_pylist()
            ok = np.array([e is None for e in errors], bool)
            return _pixels(table.column("image").combine_chunks(), self.size)[ok], errors
        if "bytes" in table.column_names:  # read_binary_files
            data = table.column("bytes").to_pylist()
            return decode_batch(data, self.size, lambda d: decode_image(d, self.size))
        return decode_paths(paths, self.size)  # paths only: read and decode here

    def _rows(self, table: Any, paths: list, errors: list, outputs: dict) -> Any:
        from center_embed.score.output import rows_table

        names = table.column_names
        rows = rows_table(
            self.schema,
            ids=table.column("id").to_pylist() if "id" in names else paths,
            paths=paths,
            true_classes=table.column("true_class").to_pylist()
            if "true_class" in names
            else [None] * len(paths),
            errors=errors,
            outputs=outputs,
            unknown=self.model.unknown(outputs),
            class_names=self.model.info.class_names,
        )
        if "index" in names:  # read_block's input row numbers, for write_parts to name files
            rows = rows.append_column("index", table.column("index"))
        return rows


def _local_model(model: str | bytes | Any) -> str:
    """A local file for onnxruntime: the path itself, or a temporary copy of bytes, of an
    ObjectRef's bytes or of a URI."""
    if isinstance(model, str) and not is_uri(model):
        return model
    if isinstance(model, bytes):
        data = model
    elif isinstance(model, str):
        data = read_file_bytes(model)
    else:  # an ObjectRef of the bytes
        import ray

        data = ray.get(model)
    folder = tempfile.mkdtemp(prefix="center-embed-model-")
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as f:
        f.write(data)
    return path


def model_schema(model: Any, source: dict | None) -> Any:
    """The local scorer's schema and metadata for this model and input description."""
    from center_embed.score.output import make_schema, scores_metadata

    info = model.info
    metadata = scores_metadata(model.path, sha256_file(model.path), info, source or {})
    return make_schema(info.num_classes, info.embedding_dim, metadata)


def write_parts(batch: Any, out: str, schema: Any) -> Any:
    """Ray task: each contiguous run of input rows as one part file; a summary row per file.

    The summary columns: file, first, last, rows, failed, failures (JSON of the first few
    (id, error) pairs).
    """
    import pyarrow as pa

    from center_embed.score.local import MAX_FAILURES_SHOWN

    fs, root = filesystem(out)
    table = batch.sort_by("index")
    indices = table.column("index").to_numpy()
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    parts = []
    for start, stop in zip([0, *breaks], [*breaks, len(indices)], strict=True):
        run = table.slice(start, stop - start)
        first, last = int(indices[start]), int(indices[stop - 1])
        write_part(fs, root, part_name(first, last), run.drop_columns(["index"]).cast(schema))
        errors = run.column("error")
        pairs = zip(run.column("id").to_pylist(), errors.to_pylist(), strict=True)
        failures = [(i, e) for i, e in pairs if e is not None][:MAX_FAILURES_SHOWN]
        parts.append({"file": part_name(first, last), "first": first, "last": last,
                      "rows": len(run), "failed": len(errors) - errors.null_count,
                      "failures": json.dumps(failures)})  # fmt: skip
    return pa.Table.from_pylist(parts)
