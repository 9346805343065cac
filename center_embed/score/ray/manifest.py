"""The Ray engine's inputs: listed once by the driver into OUT/_inputs/, read back by block.

An input is a local folder or list (through center_embed.score.sources: the local scorer's
ids and order), a `.parquet` file of paths (columns `path`, optional `id` and `true_class`)
or a remote folder (s3://...). The driver streams its rows, in order, into Parquet files of
GROUPS_PER_INPUT_FILE row groups, one row group per block of `rows_per_block` rows; the
read_block tasks read back the blocks they are given.

Imports pyarrow only inside functions; never ray, never torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from center_embed.errors import UserError
from center_embed.score.ray.fs import filesystem, is_uri

INPUTS_DIR = "_inputs"
GROUPS_PER_INPUT_FILE = 64  # blocks (row groups) per manifest file: small footers to read


def open_inputs(path: str, all_files: bool = False) -> tuple[dict[str, object], Iterator]:
    """(describe() of the input, lazy (id, path, true_class) tuples in a fixed order)."""
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


def _input_file(root: str, block: int) -> str:
    return f"{root}/{INPUTS_DIR}/inputs-{block // GROUPS_PER_INPUT_FILE:06d}.parquet"


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
                writer = pq.ParquetWriter(fs.open_output_stream(_input_file(root, block)), schema)
            ids, paths, classes = zip(*chunk, strict=True)
            indices = pa.array(range(count, count + len(chunk)), pa.int64())
            writer.write_table(pa.table([indices, ids, paths, classes], schema=schema))
            count, block = count + len(chunk), block + 1
    finally:
        if writer is not None:
            writer.close()
    return count


def read_blocks(out: str, blocks: list[int]) -> Any:
    """The input rows of the given blocks, as one pyarrow Table (index, id, path,
    true_class)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = filesystem(out)
    tables = []
    for block in blocks:
        with fs.open_input_file(_input_file(root, block)) as f:
            tables.append(pq.ParquetFile(f).read_row_group(block % GROUPS_PER_INPUT_FILE))
    return pa.concat_tables(tables)
