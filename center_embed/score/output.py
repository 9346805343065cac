"""Where `center-embed score` writes: row batches -> Arrow tables -> Parquet (or .npy files).

One row per image (docs/scoring.md, "Columns"):

    id            string   relative path, list line as written, or <split>/<index>
    path          string   the file read, absolute (sources.absolute_path; null for images
                           from a dataset archive)
    label         int32    nearest center                      null where the image failed
    class_name    string   that center's class                 null where the image failed
    min_distance  float32  ‖e − c‖² to it, >= 0 (a format-1    null where the image failed
                           model: its own distance kind)
    unknown_score float32  the model's unknown score (higher = more unknown; a format-1
                           model: its min distance)
    unknown       bool     unknown_score > the unknown threshold of its nearest class
    atypicality   float32  the model's `atypicality` output, part of the unknown score (0
                           for typical images, and for models exported without it)
    distances     fixed_size_list<float32>[C]  ‖e − c‖² to every center, in the
                  model's class order (the `class_names` list in the file's metadata)
    embedding     fixed_size_list<float32>[D]
    true_class    string   ground truth: the input's (a dataset archive's label, a Parquet
                           input's column), else the image's folder name where that is one
                           of the model's classes (sources.folder_class), else null
    error         string   why the image could not be scored; null for scored rows

Crash safety: rows go into numbered part files in `<out>.partial/`, each written under a
temporary name and renamed when whole, so a Ctrl-C or a kill loses at most the part being
written. `finish` merges the parts, one row group each, into a temporary file that is
renamed to `out`: the output appears under its final name only when complete. Resuming
counts the rows in the parts and skips that many inputs, after checking that the last id
written is the one the input gives at that position.

Metadata: strings under `center_embed.<key>` (scores_metadata), some of them JSON; npy's
model.json holds the same as plain JSON (read_scores_metadata). The README's scoring table
documents every column and key.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import METADATA_PREFIX, ModelInfo
from center_embed.errors import UserError
from center_embed.fileio import atomic_path, atomic_write_text
from center_embed.score.sources import folder_class

# The Parquet file and the .partial manifest (2: atypicality; 3: unknown_score)
SCORES_FORMAT_VERSION = 3
FORMATS = ("parquet", "npy")
# How `true_class` is filled, recorded in the .partial manifest: parts written before the
# folder rule (true_class left null for folders) must not be resumed into a file whose
# later rows have it.
TRUE_CLASS_RULE = "the input's, else the image's folder when a model class"
# Metadata values stored as JSON text (the rest are plain strings); read_scores_metadata
# decodes them, so npy's model.json and Python readers get lists, dicts and numbers.
JSON_METADATA_KEYS = ("scores_version", "class_names", "embedding_dim", "unknown_threshold",
                      "source", "model_format_version")  # fmt: skip


def scores_metadata(
    model_path: Path, model_sha256: str, info: ModelInfo, source: dict[str, Any]
) -> dict[str, str]:
    """The output's key-value metadata: which model scored which input."""
    values = {
        "scores_version": str(SCORES_FORMAT_VERSION),
        "model": model_path.name,
        "model_sha256": model_sha256,
        "class_names": json.dumps(info.class_names),
        "embedding_dim": str(info.embedding_dim),
        "model_format_version": json.dumps(info.format_version),
        "distance": info.distance,
        "unknown_score": info.unknown_score,
        "unknown_threshold": json.dumps(info.unknown_threshold),
        "source": json.dumps(source),
    }
    return {METADATA_PREFIX + key: value for key, value in values.items()}


def read_scores_metadata(metadata: dict) -> dict[str, Any]:
    """A scores file's metadata as plain values, keys without the `center_embed.` prefix:
    `class_names` a list (the class order of `distances`), `source` a dict, numbers as
    numbers. Takes `pq.read_schema(path).metadata` (bytes) or a dict of strings.

        meta = read_scores_metadata(pq.read_schema("scores.parquet").metadata)
        meta["class_names"][k]  # the class of distances[k]
    """
    values: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        if not key.startswith(METADATA_PREFIX):
            continue  # pyarrow's own (ARROW:schema), not ours
        key = key[len(METADATA_PREFIX) :]
        values[key] = json.loads(value) if key in JSON_METADATA_KEYS else value
    return values


def make_schema(num_classes: int, embedding_dim: int, metadata: dict[str, str]):
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string()),
            pa.field("label", pa.int32()),
            pa.field("class_name", pa.string()),
            pa.field("min_distance", pa.float32()),
            pa.field("unknown_score", pa.float32()),
            pa.field("unknown", pa.bool_()),
            pa.field("atypicality", pa.float32()),
            pa.field("distances", pa.list_(pa.float32(), num_classes)),
            pa.field("embedding", pa.list_(pa.float32(), embedding_dim)),
            pa.field("true_class", pa.string()),
            pa.field("error", pa.string()),
        ],
        metadata={k.encode(): v.encode() for k, v in metadata.items()},
    )


def rows_table(
    schema,
    ids: list[str],
    paths: list[str | None],
    true_classes: list[str | None],
    errors: list[str | None],
    outputs: dict[str, np.ndarray],
    unknown: np.ndarray,
    class_names: list[str],
):
    """One batch as an Arrow table. `outputs` and `unknown` hold the scored rows only, in
    order; rows with an error get nulls in every model column."""
    import pyarrow as pa

    n = len(ids)
    true_classes = with_folder_classes(true_classes, paths, class_names)
    failed = np.array([e is not None for e in errors], dtype=bool)
    ok = ~failed

    def full(values: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full((n, *values.shape[1:]), fill, dtype=values.dtype)
        out[ok] = values
        return out

    mask = pa.array(failed) if failed.any() else None
    labels = full(outputs["labels"].astype(np.int32), 0)
    columns = [
        pa.array(ids, pa.string()),
        pa.array(paths, pa.string()),
        pa.array(labels, pa.int32(), mask=failed),
        pa.DictionaryArray.from_arrays(
            pa.array(labels, pa.int32(), mask=failed), pa.array(class_names, pa.string())
        ).cast(pa.string()),
        pa.array(full(outputs["min_distances"].astype(np.float32), 0), pa.float32(), mask=failed),
        pa.array(full(outputs["unknown_scores"].astype(np.float32), 0), pa.float32(), mask=failed),
        pa.array(full(unknown.astype(bool), False), pa.bool_(), mask=failed),
        pa.array(full(outputs["atypicality"].astype(np.float32), 0), pa.float32(), mask=failed),
    ]
    for name in ("distances", "embeddings"):
        values = full(outputs[name].astype(np.float32), 0)  # (n, C) or (n, D)
        flat = pa.array(values.reshape(-1), pa.float32())
        columns.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=mask))
    columns += [pa.array(true_classes, pa.string()), pa.array(errors, pa.string())]
    return pa.Table.from_arrays(columns, schema=schema)


def with_folder_classes(
    true_classes: list[str | None], paths: list[str | None], class_names: list[str]
) -> list[str | None]:
    """Each row's ground truth: the input's own where it gives one, else its folder's name
    when that is one of `class_names` (sources.folder_class), else None. Here, where rows
    are built, so both engines and every kind of input follow the one rule."""
    pairs = zip(true_classes, paths, strict=True)
    if all(given is not None or path is None for given, path in pairs):
        return true_classes  # nothing to fill (an archive): skip the set of C names
    known = frozenset(class_names)
    return [
        given if given is not None else folder_class(path, known)
        for given, path in zip(true_classes, paths, strict=True)
    ]


@dataclass
class Progress:
    """What the parts already on disk hold (non-zero only when resuming)."""

    rows: int = 0
    failed: int = 0
    last_id: str | None = None
    parts: list[Path] = field(default_factory=list)


class PartWriter:
    """Buffers batch tables and writes them as whole part files; merges them at the end."""

    def __init__(
        self,
        out: Path,
        fmt: str,
        manifest: dict[str, Any],
        schema,
        rows_per_part: int,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.out, self.fmt, self.schema = out, fmt, schema
        self.rows_per_part = max(1, rows_per_part)
        self.partial = out.with_name(out.name + ".partial")
        self.manifest = {"format_version": SCORES_FORMAT_VERSION, **manifest, "format": fmt,
                         "true_class": TRUE_CLASS_RULE}  # fmt: skip
        self.buffer: list = []
        self.buffered = 0
        self.complete = False
        self.progress = self._open(resume, overwrite)

    # ---------------------------------------------------------------- start or resume

    def _open(self, resume: bool, overwrite: bool) -> Progress:
        if self.out.is_dir() and not (self.fmt == "npy" and is_npy_output(self.out)):
            raise UserError(
                f"--out {self.out} is a folder"
                + (" that holds no earlier npy scores" if self.fmt == "npy" else "")
                + "; give a new path"
            )
        if overwrite and not resume:
            shutil.rmtree(self.partial, ignore_errors=True)
        if self.partial.is_dir():
            if not resume:
                raise UserError(
                    f"an interrupted run left {self.partial}; pass --resume to continue it "
                    f"or --overwrite to start again"
                )
            return self._resume()
        if self.out.exists():
            if resume:
                self.complete = True  # finished earlier: nothing left to do
                return Progress()
            if not overwrite:
                raise UserError(f"{self.out} exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir()
        atomic_write_text(self.partial / "manifest.json", _json_text(self.manifest))
        return Progress()

    def _resume(self) -> Progress:
        import pyarrow.parquet as pq

        try:
            before = json.loads((self.partial / "manifest.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{self.partial} has no readable manifest.json; delete it") from None
        rule_before = before.pop("true_class", None)  # compared last, with its own message
        changed = sorted(
            k
            for k in {*before, *self.manifest} - {"true_class"}
            if before.get(k) != self.manifest.get(k)
        )
        if changed:
            detail = "; ".join(
                f"{k}: was {before.get(k)!r}, now {self.manifest.get(k)!r}" for k in changed
            )
            raise UserError(f"cannot resume {self.partial}, the run differs: {detail}")
        _check_true_class_rule(rule_before, before, self.partial)
        for stale in self.partial.glob("*.tmp"):  # what was being written when killed
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        progress = Progress(parts=sorted(self.partial.glob("part-*.parquet")))
        for part in progress.parts:
            errors = pq.read_table(part, columns=["error"]).column("error")
            progress.rows += len(errors)
            progress.failed += len(errors) - errors.null_count
        if progress.parts:
            ids = pq.read_table(progress.parts[-1], columns=["id"]).column("id")
            progress.last_id = ids[len(ids) - 1].as_py()
        return progress

    # ---------------------------------------------------------------- writing

    def write(self, table) -> None:
        self.buffer.append(table)
        self.buffered += len(table)
        if self.buffered >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        part = self.partial / f"part-{len(self.progress.parts):06d}.parquet"
        with atomic_path(part) as tmp:  # a part exists whole or not at all
            pq.write_table(table, tmp, compression="none")  # read once more, by the merge
        self.progress.parts.append(part)
        self.progress.rows += len(table)
        self.buffer, self.buffered = [], 0

    def discard_if_empty(self) -> None:
        """Remove the .partial folder of a failed run that wrote no part (nothing to resume)."""
        if not self.progress.parts:
            shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self) -> Path:
        """Merge the parts into `out` (written beside it, then renamed); drop the parts."""
        if self.complete:
            return self.out
        self.flush()
        with atomic_path(self.out, directory=self.fmt == "npy") as tmp:
            if self.fmt == "parquet":
                self._merge_parquet(tmp)
            else:
                self._merge_npy(tmp)
            if self.out.is_dir():  # npy --overwrite: a rename cannot replace a full folder
                shutil.rmtree(self.out)
        shutil.rmtree(self.partial)
        self.complete = True
        return self.out

    def _merge_parquet(self, tmp: Path) -> None:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(tmp, self.schema) as writer:
            for part in self.progress.parts:  # one part in memory at a time
                table = pq.read_table(part, schema=self.schema)
                writer.write_table(table, row_group_size=max(len(table), 1))

    def _merge_npy(self, tmp: Path) -> None:
        """A folder of arrays a reader can memory-map; failed rows hold label -1 and NaN."""
        import pyarrow.parquet as pq

        n = self.progress.rows
        c = self.schema.field("distances").type.list_size
        d = self.schema.field("embedding").type.list_size

        def array(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
            return np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, shape)

        arrays = {
            "embeddings": array("embeddings", np.float32, (n, d)),
            "distances": array("distances", np.float32, (n, c)),
            "labels": array("labels", np.int64, (n,)),
            "min_distances": array("min_distances", np.float32, (n,)),
            "unknown_scores": array("unknown_scores", np.float32, (n,)),
            "unknown": array("unknown", np.bool_, (n,)),
            "atypicality": array("atypicality", np.float32, (n,)),
        }
        start = 0
        with (tmp / "rows.jsonl").open("w", encoding="utf-8") as rows:
            for part in self.progress.parts:
                t = pq.read_table(part, schema=self.schema)
                stop = start + len(t)
                failed = t.column("error").is_valid().to_numpy(zero_copy_only=False)
                for column, name, width in (
                    ("embedding", "embeddings", d),
                    ("distances", "distances", c),
                ):
                    flat = t.column(column).combine_chunks().flatten().to_numpy()
                    values = np.full((len(t), width), np.nan, np.float32)
                    values[~failed] = flat.reshape(-1, width)
                    arrays[name][start:stop] = values
                arrays["labels"][start:stop] = t.column("label").fill_null(-1).to_numpy()
                arrays["min_distances"][start:stop] = (
                    t.column("min_distance").fill_null(np.nan).to_numpy()
                )
                arrays["unknown_scores"][start:stop] = (
                    t.column("unknown_score").fill_null(np.nan).to_numpy()
                )
                arrays["unknown"][start:stop] = t.column("unknown").fill_null(False).to_numpy()
                arrays["atypicality"][start:stop] = (
                    t.column("atypicality").fill_null(np.nan).to_numpy()
                )
                for row in t.select(["id", "path", "true_class", "error"]).to_pylist():
                    rows.write(json.dumps(row) + "\n")
                start = stop
        for values in arrays.values():
            values.flush()
        meta = read_scores_metadata(self.schema.metadata)  # plain JSON, no JSON in strings
        (tmp / "model.json").write_text(_json_text(meta))  # in the folder renamed whole


def _check_true_class_rule(rule: str | None, before: dict[str, Any], partial: Path) -> None:
    """Refuse to resume parts whose `true_class` followed another rule (`rule`: None for runs
    from before folder names filled it), as their rows would disagree with the rest; a
    dataset archive's rows never depended on it, so its resume goes on."""
    if rule == TRUE_CLASS_RULE:
        return
    if rule is not None:
        raise UserError(
            f"cannot resume {partial}, the run differs: true_class: was {rule!r}, now "
            f"{TRUE_CLASS_RULE!r}; pass --overwrite to score the input again"
        )
    source = before.get("source")
    if isinstance(source, dict) and source.get("kind") == "dataset":
        return
    raise UserError(
        f"cannot resume {partial}: an earlier version of center-embed started it and left "
        f"`true_class` empty for image folders; pass --overwrite to score the input again"
    )


def is_npy_output(folder: Path) -> bool:
    """A folder `--format npy` wrote (so --overwrite may replace it), not any folder."""
    return (folder / "rows.jsonl").is_file() and (folder / "labels.npy").is_file()


def count_rows(out: Path, fmt: str) -> int:
    """Rows in a finished output."""
    if fmt == "npy":
        return len(np.load(out / "labels.npy", mmap_mode="r"))
    import pyarrow.parquet as pq

    return pq.read_metadata(out).num_rows


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
