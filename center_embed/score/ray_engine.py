"""Scoring on Ray Data: the local scorer's rows, from one machine to a cluster.

    center-embed score model.onnx /data/images --out scores/ --engine ray [--address auto]

The pipeline (Ray streams blocks through it; nothing is held whole anywhere):

    the driver lists the inputs into OUT/_inputs/ (Parquet, one row group per block)
      ──► read_block: a block's rows, each file read and decoded (Ray tasks)
      ──► ScoreBatches: one onnxruntime session per actor (an actor pool; num_gpus=1 each
          with --device cuda), rows built by center_embed.score.output (the same schema)
      ──► write_parts: one Parquet file per contiguous run of input rows (Ray tasks)
      ──► the driver checks that every input has exactly one row, then writes _SUCCESS last

OUT is a Parquet dataset: `part-<first>-<last>.parquet` hold input rows first..last
(inclusive, 0-based, zero-padded, so sorted names are input order) in exactly the local
scorer's schema and metadata; `pyarrow.parquet.read_table(OUT)` and Ray/Spark/DuckDB readers
skip the `_`-prefixed bookkeeping (`_inputs/`, `_run.json`, `_SUCCESS`).

Why the parts are named by input row range: a task that Ray retries (a killed actor, a lost
node) writes the same rows under the same name again, so a retry overwrites instead of
duplicating; `--resume` skips every input row inside a completed part's range, read from
the names alone; and the final check is an interval check over names. A part is written
under a dot-name and renamed when whole (local disks), or uploaded in one object PUT (s3),
so a completed name always holds a readable file.

Unreadable images become rows with an `error` (the local scorer's messages), never a failed
task. With --device cpu the decode tasks fuse into the actors (Ray runs them in the same
process, saving a copy); with cuda they stay CPU tasks feeding the GPU actors.

Imports numpy, Pillow, pyarrow and onnxruntime; ray only inside functions (it is the
optional extra `ray`). Never torch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import empty_outputs
from center_embed.errors import UserError
from center_embed.fileio import sha256_file

RUN_FILE = "_run.json"  # what the run scores (model, inputs, block size): resume checks it
SUCCESS_FILE = "_SUCCESS"  # written last: the dataset is complete
INPUTS_DIR = "_inputs"
GROUPS_PER_INPUT_FILE = 64  # blocks (row groups) per manifest file: small footers to read
RETRIES = 3  # Ray retries of a task, restarts of an actor and retries of its calls
MAX_FAILURES_SHOWN = 10
# No CPU reserved for the light stages (listing rows, writing parts): actors that hold
# every CPU would otherwise starve them (measured: the run hangs).
LIGHT_CPUS = 0
# Test-only fault injection: a file path; its content N makes the first actor that claims
# the file (by renaming it) SIGKILL itself after N batches. Unset: nothing happens.
KILL_HOOK_ENV = "CENTER_EMBED_TEST_KILL_ACTOR"


# ------------------------------------------------------------------ filesystems


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme_and_host: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(scheme_and_host + "/")[0]


def filesystem(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow knows."""
    import pyarrow.fs

    text = str(path)
    if not is_uri(text):
        return pyarrow.fs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    fs, inner = pyarrow.fs.FileSystem.from_uri(text)
    return fs, inner.rstrip("/")


def read_file_bytes(path: str) -> bytes:
    """A file's bytes; local paths through open() so errors read as in the local scorer."""
    if not is_uri(path):
        with open(path, "rb", buffering=0) as f:
            return f.read()
    scheme, rest = path.split("://", 1)
    fs = _filesystem_for(f"{scheme}://{rest.split('/', 1)[0]}")
    inner = fs.normalize_path(path) if scheme == "file" else rest
    with fs.open_input_stream(inner) as f:
        return f.read()


# ------------------------------------------------------------------ inputs


def open_inputs(path: str, all_files: bool = False) -> tuple[dict[str, object], Iterator]:
    """(describe() of the input, lazy (id, path, true_class) tuples in a fixed order).

    Local folders and lists go through center_embed.score.sources (the same ids and order
    as the local scorer); a `.parquet` file of paths (columns `path`, optional `id` and
    `true_class`) and remote folders (s3://...) are read through pyarrow.
    """
    from center_embed.score.sources import DatasetSource, open_source

    if str(path).endswith(".parquet"):
        return _parquet_inputs(str(path))
    if is_uri(path):
        return _remote_folder_inputs(str(path), all_files)
    source = open_source(path, all_files=all_files)
    if isinstance(source, DatasetSource):
        raise UserError(
            f"{path} is a CIFAR-10 archive; --engine ray scores image files (a folder, a list "
            f"or a Parquet file of paths): use --engine local for archives"
        )
    return source.describe(), ((i.id, i.path, i.true_class) for i in source.items())


def _parquet_inputs(path: str) -> tuple[dict[str, object], Iterator]:
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(inner))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a Parquet file of paths: {e}") from None
    names = parquet.schema_arrow.names
    if "path" not in names:
        raise UserError(f"{path} has columns {names}; a `path` column is required")
    columns = [c for c in ("path", "id", "true_class") if c in names]
    base = str(path).rsplit("/", 1)[0] if is_uri(path) else str(Path(inner).parent)

    def rows() -> Iterator[tuple]:
        for batch in parquet.iter_batches(batch_size=8192, columns=columns):
            values = batch.to_pydict()
            ids = values.get("id", values["path"])
            classes = values.get("true_class", [None] * len(ids))
            for image_id, image_path, true_class in zip(ids, values["path"], classes, strict=True):
                absolute = is_uri(image_path) or os.path.isabs(image_path)
                yield image_id, image_path if absolute else f"{base}/{image_path}", true_class

    describe = {"kind": "parquet", "path": path, "rows": parquet.metadata.num_rows}
    return describe, rows()


def _remote_folder_inputs(uri: str, all_files: bool) -> tuple[dict[str, object], Iterator]:
    """Every image object under a URI prefix, sorted; hidden names skipped as locally."""
    import pyarrow.fs

    from center_embed.imageio import image_extensions

    fs, root = filesystem(uri)
    extensions = image_extensions()
    scheme = uri.split("://", 1)[0]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))

    def rows() -> Iterator[tuple]:
        for info in sorted(infos, key=lambda i: i.path):
            relative = info.path[len(root) :].lstrip("/")
            if info.type != pyarrow.fs.FileType.File or any(
                part.startswith(".") for part in relative.split("/")
            ):
                continue
            if all_files or os.path.splitext(relative)[1].lower() in extensions:
                yield relative, f"{scheme}://{info.path}", None

    return {"kind": "folder", "path": uri, "all_files": all_files}, rows()


def write_manifest(rows: Iterator[tuple], out: str, rows_per_block: int) -> int:
    """The inputs as OUT/_inputs/inputs-NNNNNN.parquet, one row group per block; row count.

    Streams: one block in memory at a time, however many inputs there are.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = filesystem(out)
    fs.create_dir(f"{root}/{INPUTS_DIR}")
    schema = pa.schema([("index", pa.int64()), ("id", pa.string()), ("path", pa.string()),
                        ("true_class", pa.string())])  # fmt: skip
    count, block, writer = 0, 0, None
    try:
        while chunk := [r for _, r in zip(range(rows_per_block), rows, strict=False)]:
            if block % GROUPS_PER_INPUT_FILE == 0:
                if writer is not None:
                    writer.close()
                name = f"{root}/{INPUTS_DIR}/inputs-{block // GROUPS_PER_INPUT_FILE:06d}.parquet"
                writer = pq.ParquetWriter(fs.open_output_stream(name), schema)
            ids, paths, classes = zip(*chunk, strict=True)
            indices = pa.array(range(count, count + len(chunk)), pa.int64())
            writer.write_table(pa.table([indices, ids, paths, classes], schema=schema))
            count, block = count + len(chunk), block + 1
    finally:
        if writer is not None:
            writer.close()
    return count


# ------------------------------------------------------------------ the stages


def read_block(
    batch: dict, out: str, rows_per_block: int, size: int, covered: list, decode: bool
) -> Any:
    """Ray task: the input rows of the given block numbers, with the images decoded if asked.

    Columns: index, id, path, true_class, and with `decode` image (fixed-size binary,
    size*size*3 bytes; null where the image failed) and error. Rows inside `covered`
    ((first, last) ranges already written) are dropped: that is how --resume skips them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = filesystem(out)
    tables = []
    for block in np.asarray(batch["block"]).tolist():
        name = f"{root}/{INPUTS_DIR}/inputs-{block // GROUPS_PER_INPUT_FILE:06d}.parquet"
        with fs.open_input_file(name) as f:
            tables.append(pq.ParquetFile(f).read_row_group(block % GROUPS_PER_INPUT_FILE))
    table = pa.concat_tables(tables)
    keep = ~_inside(table.column("index").to_numpy(), covered)
    table = table.filter(pa.array(keep))
    if not decode:
        return table
    images, errors = decode_paths(table.column("path").to_pylist(), size)
    return table.append_column("image", images).append_column(
        "error", pa.array(errors, pa.string())
    )


def _inside(indices: np.ndarray, ranges: list) -> np.ndarray:
    """True where an index lies in one of the sorted, disjoint (first, last) ranges."""
    if not ranges:
        return np.zeros(len(indices), bool)
    firsts = np.array([r[0] for r in ranges])
    lasts = np.array([r[1] for r in ranges])
    at = np.searchsorted(firsts, indices, side="right") - 1
    return (at >= 0) & (indices <= lasts[np.maximum(at, 0)])


def decode_paths(paths: list[str | None], size: int) -> tuple[Any, list[str | None]]:
    """(fixed-size binary array of decoded images, error or None per path)."""
    import pyarrow as pa

    from center_embed.imageio import ImageDecodeError, decode_image

    images: list[bytes | None] = []
    errors: list[str | None] = []
    for path in paths:
        image, error = None, None
        try:
            image = decode_image(read_file_bytes(path), size).tobytes()
        except ImageDecodeError as e:
            error = str(e)
        except OSError as e:  # the local scorer's message, word for word
            error = f"cannot read file: {e.strerror or e}"
        images.append(image)
        errors.append(error)
    return pa.array(images, pa.binary(size * size * 3)), errors


class ScoreBatches:
    """A callable class for `Dataset.map_batches`: image rows in, scored rows out.

    One onnxruntime session per instance (Ray makes one instance per actor). A batch holds
    either `bytes` (as `ray.data.read_binary_files(..., include_paths=True)` gives: decoded
    here) or `image` and `error` (decoded upstream by `read_block`), plus `path` and
    optionally `id` (default: the path) and `true_class`. The result is a pyarrow Table in
    the local scorer's schema (center_embed.score.output.make_schema), so
    `ds.write_parquet(...)` writes the same columns.

        ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
        ds = ds.map_batches(ScoreBatches, fn_constructor_kwargs={"model": "model.onnx"},
                            concurrency=8)
        ds.write_parquet("s3://bucket/scores/")

    model: a path (local, or a URI pyarrow reads) or the model file's bytes.
    """

    def __init__(self, model: str | bytes, device: str = "cpu", threads: int = 1,
                 schema: Any = None, source: dict | None = None) -> None:  # fmt: skip
        from center_embed.runtime import OnnxModel, RuntimeOptions

        self.model = OnnxModel(_local_model(model), RuntimeOptions(device=device, threads=threads))
        self.size = self.model.info.input_size[0]
        self.schema = schema if schema is not None else model_schema(self.model, source)
        self.batches = 0

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
        paths = table.column("path").to_pylist()
        if "image" in table.column_names:  # decoded by read_block tasks
            images, errors = table.column("image").combine_chunks(), table["error"].to_pylist()
        elif "bytes" in table.column_names:  # read_binary_files
            images, errors = decode_paths_from_bytes(table.column("bytes"), self.size)
        else:  # paths only: read and decode here
            images, errors = decode_paths(paths, self.size)
        ok = np.array([e is None for e in errors], bool)
        pixels = _pixels(images, self.size)[ok]
        outputs = self.model.run(pixels) if len(pixels) else empty_outputs(
            self.model.info.num_classes, self.model.info.embedding_dim
        )  # fmt: skip
        rows = self._rows(table, paths, errors, outputs)
        self.batches += 1
        _test_kill_hook(self.batches)
        return rows

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


def decode_paths_from_bytes(column: Any, size: int) -> tuple[Any, list[str | None]]:
    """The `bytes` column of read_binary_files, decoded as decode_paths does files."""
    import pyarrow as pa

    from center_embed.imageio import ImageDecodeError, decode_image

    images: list[bytes | None] = []
    errors: list[str | None] = []
    for data in column.to_pylist():
        try:
            images.append(decode_image(data, size).tobytes())
            errors.append(None)
        except ImageDecodeError as e:
            images.append(None)
            errors.append(str(e))
    return pa.array(images, pa.binary(size * size * 3)), errors


def _pixels(images: Any, size: int) -> np.ndarray:
    """A fixed-size binary array as uint8 (n, size, size, 3), null slots included."""
    data = np.frombuffer(images.buffers()[1], np.uint8)
    width = size * size * 3
    start = images.offset * width
    return data[start : start + len(images) * width].reshape(-1, size, size, 3)


def _local_model(model: str | bytes) -> str:
    """A local file for onnxruntime: the path itself, or a temporary copy of bytes or a URI."""
    if isinstance(model, str) and not is_uri(model):
        return model
    data = model if isinstance(model, bytes) else read_file_bytes(model)
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


def _test_kill_hook(batches: int) -> None:
    """Fault injection for the tests (KILL_HOOK_ENV); a no-op unless that file exists."""
    trigger = os.environ.get(KILL_HOOK_ENV)
    if not trigger or not os.path.exists(trigger):
        return
    with open(trigger) as f:
        after = int(f.read().strip() or 1)
    if batches < after:
        return
    try:
        os.rename(trigger, trigger + ".claimed")  # one actor only, once
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def write_parts(batch: Any, out: str, schema: Any) -> Any:
    """Ray task: each contiguous run of input rows as one part file; a summary row per file.

    The summary columns: file, first, last, rows, failed, failures (JSON of the first few
    (id, error) pairs).
    """
    import pyarrow as pa

    fs, root = filesystem(out)
    table = batch.sort_by("index")
    indices = table.column("index").to_numpy()
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    parts = []
    for start, stop in zip([0, *breaks], [*breaks, len(indices)], strict=True):
        run = table.slice(start, stop - start)
        first, last = int(indices[start]), int(indices[stop - 1])
        _write_part(fs, root, part_name(first, last), run.drop_columns(["index"]).cast(schema))
        errors = run.column("error")
        pairs = zip(run.column("id").to_pylist(), errors.to_pylist(), strict=True)
        failures = [(i, e) for i, e in pairs if e is not None][:MAX_FAILURES_SHOWN]
        parts.append({"file": part_name(first, last), "first": first, "last": last,
                      "rows": len(run), "failed": len(errors) - errors.null_count,
                      "failures": json.dumps(failures)})  # fmt: skip
    return pa.Table.from_pylist(parts)


def part_name(first: int, last: int) -> str:
    return f"part-{first:012d}-{last:012d}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    first, _, last = name[len("part-") : -len(".parquet")].partition("-")
    return (int(first), int(last)) if first.isdigit() and last.isdigit() else None


def _write_part(fs: Any, root: str, name: str, table: Any) -> None:
    import pyarrow.fs
    import pyarrow.parquet as pq

    if isinstance(fs, pyarrow.fs.LocalFileSystem):  # whole or not at all: write, then rename
        tmp = f"{root}/.{name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, f"{root}/{name}")
    else:  # object stores publish an object only once its upload completes
        pq.write_table(table, f"{root}/{name}", filesystem=fs)


# ------------------------------------------------------------------ the driver


def score_on_ray(
    model: str | Path,
    input: str,
    out: str,
    *,
    address: str | None = None,
    actors: int = 0,
    device: str = "auto",
    batch_size: int = 256,
    rows_per_block: int = 2048,
    threads: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    all_files: bool = False,
    progress: bool = True,
):
    """Score every input image into the Parquet dataset `out`; see the module docstring.

    Connects to the Ray cluster at `address` ("auto": the one this machine belongs to), or
    to the one already initialised in this process, or starts a local one. Returns a
    center_embed.score.local.ScoreSummary.
    """
    import ray

    from center_embed.score.local import ScoreSummary
    from center_embed.score.output import SCORES_FORMAT_VERSION, TRUE_CLASS_RULE

    if batch_size < 1 or rows_per_block < 1 or actors < 0 or threads < 0:
        raise UserError("--batch-size and --row-group-size must be positive, --actors >= 0")
    driver_model, size = _open_driver_model(model)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    device = _resolve_device(device)
    describe, rows = open_inputs(input, all_files)
    run = {"format_version": SCORES_FORMAT_VERSION, "model_sha256": sha256_file(driver_model.path),
           "source": describe, "rows_per_block": rows_per_block}  # fmt: skip
    run["true_class"] = TRUE_CLASS_RULE  # a run from before the folder rule is not resumed
    state = _open_output(out, run, resume, overwrite)
    summary = ScoreSummary(out, 0, 0, 0, 0, 0.0)  # type: ignore[arg-type]
    if state == "complete":
        done = json.loads(_read_text(out, SUCCESS_FILE))
        summary.rows = summary.resumed_from = done["rows"]
        summary.failed = done["failed"]
        return summary
    start = time.perf_counter()
    if state == "new":
        run["rows"] = write_manifest(rows, out, rows_per_block)
        _write_text(out, RUN_FILE, json.dumps(run, indent=2, sort_keys=True))
    total = json.loads(_read_text(out, RUN_FILE))["rows"]
    covered, summary.failed = _completed_parts(out)
    summary.resumed_from = sum(last - first + 1 for first, last in covered)
    summary.rows = summary.resumed_from
    schema = model_schema(driver_model, describe)
    dataset = _pipeline(out, model, schema, describe, size, total, covered, device,
                        actors, batch_size, rows_per_block, threads)  # fmt: skip
    _consume(dataset, summary, total, progress)
    summary.seconds = time.perf_counter() - start
    _finish(out, total, summary)
    return summary


def _open_driver_model(model: str | Path):
    """The model as the driver needs it (metadata and digest; actors open their own), and
    its square input size."""
    from center_embed.runtime import OnnxModel, RuntimeOptions

    driver_model = OnnxModel(model, RuntimeOptions(device="cpu", threads=1))
    size = driver_model.info.input_size[0]
    if driver_model.info.input_size != (size, size):
        raise UserError(f"{model}: only square inputs are supported")
    return driver_model, size


def _resolve_device(device: str) -> str:
    """auto: cuda when the cluster has GPUs, else cpu."""
    import ray

    if device == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--engine ray takes --device auto, cpu or cuda, not {device!r}")
    if device == "cuda" and ray.cluster_resources().get("GPU", 0) == 0:
        raise UserError("--device cuda, but the Ray cluster has no GPUs")
    return device


def _open_output(out: str, run: dict, resume: bool, overwrite: bool) -> str:
    """'new', 'resume' or 'complete', after checking what `out` holds."""
    import pyarrow.fs

    fs, root = filesystem(out)
    info = fs.get_file_info(root)
    ours = fs.get_file_info(f"{root}/{RUN_FILE}").type == pyarrow.fs.FileType.File
    if info.type == pyarrow.fs.FileType.File:
        raise UserError(f"--out {out} is a file; --engine ray writes a folder (a Parquet dataset)")
    if info.type == pyarrow.fs.FileType.Directory and not ours:
        if fs.get_file_info(pyarrow.fs.FileSelector(root)):
            raise UserError(
                f"--out {out} is a folder that holds no earlier scores; give a new path"
            )
    elif ours and overwrite and not resume:
        fs.delete_dir(root)
    elif ours:
        complete = fs.get_file_info(f"{root}/{SUCCESS_FILE}").type == pyarrow.fs.FileType.File
        if not resume:
            what = (
                "exists" if complete else "holds an interrupted run; pass --resume to continue it"
            )
            raise UserError(f"{out} {what} (or --overwrite to start again)")
        before = json.loads(_read_text(out, RUN_FILE))
        changed = sorted(k for k in run if before.get(k) != run[k])
        if changed:
            detail = "; ".join(f"{k}: was {before.get(k)!r}, now {run[k]!r}" for k in changed)
            raise UserError(f"cannot resume {out}, the run differs: {detail}")
        return "complete" if complete else "resume"
    fs.delete_dir_contents(root, missing_dir_ok=True)  # a run killed while listing: start again
    fs.create_dir(root)
    return "new"


def _read_text(out: str, name: str) -> str:
    fs, root = filesystem(out)
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read().decode()


def _write_text(out: str, name: str, text: str) -> None:
    fs, root = filesystem(out)
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(text.encode())


def _completed_parts(out: str) -> tuple[list[tuple[int, int]], int]:
    """(sorted (first, last) ranges of the whole parts in `out`, failed rows in them).

    Deletes what a killed writer left (dot-named temporary files). Overlapping ranges would
    mean duplicated rows; they are refused.
    """
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, root = filesystem(out)
    ranges, failed = [], 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
            fs.delete_file(info.path)
        elif (found := parse_part_name(info.base_name)) is not None:
            ranges.append(found)
            errors = pq.read_table(info.path, columns=["error"], filesystem=fs).column("error")
            failed += len(errors) - errors.null_count
    ranges.sort()
    for before, after in zip(ranges, ranges[1:], strict=False):
        if after[0] <= before[1]:
            raise UserError(f"{out}: parts {part_name(*before)} and {part_name(*after)} overlap")
    return ranges, failed


def _pipeline(out, model, schema, describe, size, total, covered, device, actors,
              batch_size, rows_per_block, threads):  # fmt: skip
    """The lazy Ray Dataset of write summaries for the blocks not yet fully written."""
    import ray

    blocks = [
        b for b in range(-(-total // rows_per_block))
        if not _inside(np.arange(b * rows_per_block, min(total, (b + 1) * rows_per_block)),
                       covered).all()
    ]  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts rows, not Ray's blocks
    gpu = device == "cuda"
    if actors == 0:
        actors = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)) or 1
    with open(model, "rb") as f:
        model_bytes = f.read()  # sent to the actors: they need no shared filesystem
    with warnings.catch_warnings():  # Ray 2.60 deprecates retry kwargs but names no successor
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _stages(out, model_bytes, schema, describe, size, covered, blocks, gpu, actors,
                       batch_size, rows_per_block, threads)  # fmt: skip


def _stages(out, model_bytes, schema, describe, size, covered, blocks, gpu, actors,
            batch_size, rows_per_block, threads):  # fmt: skip
    import ray

    dataset = ray.data.from_items([{"block": b} for b in blocks],
                                  override_num_blocks=max(len(blocks), 1))  # fmt: skip
    # On CPUs the actors decode (decoding in separate tasks would only move work between the
    # same cores, plus a copy); GPU actors are fed by CPU tasks that decode.
    dataset = dataset.map_batches(
        read_block, batch_size=1, batch_format="numpy", num_cpus=1 if gpu else LIGHT_CPUS,
        max_retries=RETRIES, fn_kwargs={"out": out, "rows_per_block": rows_per_block,
                                        "size": size, "covered": covered, "decode": gpu},
    )  # fmt: skip
    dataset = dataset.map_batches(
        ScoreBatches, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpu else 0,
        max_restarts=RETRIES, max_task_retries=RETRIES,
        fn_constructor_kwargs={"model": model_bytes, "device": "cuda" if gpu else "cpu",
                               "threads": threads, "schema": schema, "source": describe},
    )  # fmt: skip
    return dataset.map_batches(
        write_parts, batch_size=None, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
        max_retries=RETRIES, fn_kwargs={"out": out, "schema": schema},
    )  # fmt: skip


def _consume(dataset, summary, total: int, progress: bool) -> None:
    """Run the pipeline, counting rows and failures from the write summaries."""
    from center_embed.score.local import _progress_bar

    bar = _progress_bar(total if progress else None, summary.rows, progress)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for part in batch.to_pylist():
                summary.scored += part["rows"]
                summary.rows += part["rows"]
                summary.failed += part["failed"]
                room = MAX_FAILURES_SHOWN - len(summary.failures)
                summary.failures += [tuple(f) for f in json.loads(part["failures"])][:room]
                bar.update(part["rows"])
    finally:
        bar.close()


def _finish(out: str, total: int, summary) -> None:
    """Check that the parts hold every input row exactly once; then write _SUCCESS."""
    ranges, failed = _completed_parts(out)
    expected = 0
    for first, last in ranges:
        if first != expected:
            raise UserError(f"{out}: input rows {expected}..{first - 1} have no part; --resume")
        expected = last + 1
    if expected != total:
        raise UserError(f"{out}: input rows {expected}..{total - 1} have no part; --resume")
    done = {"rows": total, "failed": failed, "parts": len(ranges)}
    _write_text(out, SUCCESS_FILE, json.dumps(done, sort_keys=True) + "\n")
