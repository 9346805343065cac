"""`center-embed score`: a folder, a list of paths or a CIFAR-10 archive -> Parquet.

    center-embed score model.onnx /data/images --out scores.parquet
    center-embed score model.onnx paths.txt --out scores.parquet --resume

The pipeline, for any number of images in flat memory:

    source.items()  (lazy, fixed order)  ──► batches of --batch-size
        ──► --workers threads, each taking a whole batch: decode (simplejpeg for JPEGs
            where installed, else Pillow), run (--runtime, --threads intra-op threads,
            default 1), build an Arrow table
        ──► tables in input order  ──► part files  ──► merge

Why whole batches per worker and single-threaded inference: decoding is Python that holds
the GIL most of the time, while onnxruntime releases it. With one more worker than cores,
whenever one worker decodes the others keep every core busy with inference, so decoding
hides behind it. The alternative, one multi-threaded inference call beside a decoding pool,
measured worse on two cores: when a decoding thread preempts one of onnxruntime's
intra-op threads, the other spins at the next barrier.

An image that cannot be read or decoded becomes a row with an `error` and no model
outputs; it never stops the run. Ctrl-C or SIGTERM stops after the last whole part, and
`--resume` continues from there (output.py says how that stays exact).

Imports numpy, Pillow, the runtime (onnxruntime or OpenVINO) and pyarrow only: never torch.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from center_embed.contract import empty_outputs
from center_embed.errors import UserError
from center_embed.fileio import sha256_file

if TYPE_CHECKING:
    from center_embed.runtime import RuntimeOptions

MAX_FAILURES_SHOWN = 10


@dataclass
class ScoreSummary:
    out: Path
    rows: int  # rows in the output, failures included
    failed: int  # rows with an error, in the whole output
    scored: int  # images this run went through (resumed rows excluded)
    skipped: int  # files passed over as not images (by extension)
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, error), this run
    resumed_from: int = 0
    runtime: dict[str, Any] | None = None  # what ran the model (OnnxModel.runtime)

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def score(
    model,  # OnnxModel, or a path to one
    source,  # sources.Source, or a path: folder, list of paths, CIFAR-10 archive
    out: str | Path,
    *,
    fmt: str = "parquet",
    batch_size: int = 256,
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    row_group_size: int = 8192,
    progress: bool = True,
    options: RuntimeOptions | None = None,
    centers: str | Path | None = None,
) -> ScoreSummary:
    """Score every image of `source` into `out`; see the module docstring. `options`: how
    to run a model given as a path (default RuntimeOptions(): auto device, 1 thread per
    batch, onnxruntime). `centers`: a service's centers file (enrolled classes) to score
    against instead of the model's own."""
    from center_embed.score.output import count_rows

    if batch_size < 1 or row_group_size < 1 or workers < 0:
        raise UserError("--batch-size and --row-group-size must be positive, --workers >= 0")
    model = _open_model(model, centers, options)
    source = _open_source(source)
    out = Path(out)
    if not resume and source.count() == 0:
        raise UserError(_nothing_to_score(source))
    writer = _open_writer(model, source, out, fmt, row_group_size, resume, overwrite)
    done = writer.progress.rows
    summary = ScoreSummary(out, done, writer.progress.failed, 0, 0, 0.0, resumed_from=done,
                           runtime=model.runtime)  # fmt: skip
    if writer.complete:  # --resume of a run that had finished
        summary.rows = summary.resumed_from = count_rows(out, fmt)
        return summary

    start = time.perf_counter()
    items = source.items()
    _skip_written(items, done, writer.progress.last_id)
    bar = _progress_bar(source.count() if progress else None, done, progress)
    try:
        for batch, errors, table in _pipeline(model, writer.schema, items, batch_size, workers):
            writer.write(table)
            _count(summary, batch, errors)
            bar.set_postfix_str(f"failed={summary.failed}", refresh=False)
            bar.update(len(batch))
        writer.finish()
    except Exception:
        writer.discard_if_empty()  # nothing to resume: leave no .partial behind
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        summary.skipped = source.skipped
    return summary


def _open_model(model, centers, options: RuntimeOptions | None):
    """The model to score with: opened from a path, with a centers file's classes applied,
    square inputs only."""
    from center_embed.enrolment import apply_centers_file

    if isinstance(model, str | Path):  # else an OnnxModel, or one with enrolled centers
        model = open_scoring_model(model, options)
    if centers is not None:
        model = apply_centers_file(model, centers)
    h, w = model.info.input_size
    if h != w:
        raise UserError(f"{model.path}: only square inputs are supported, got {h}x{w}")
    return model


def _open_source(source):
    from center_embed.score.sources import Source, open_source

    return source if isinstance(source, Source) else open_source(source)


def _nothing_to_score(source) -> str:
    """The error for an input without a single image (never an empty "successful" file)."""
    where = source.describe().get("path", "the input")
    hint = ""
    if getattr(source, "all_files", True) is False:
        hint = " (files are chosen by image extension; --all-files tries every file)"
    return f"no images found in {where}{hint}"


def _open_writer(model, source, out: Path, fmt: str, row_group_size: int, resume: bool,
                 overwrite: bool):  # fmt: skip
    """The part writer for `out`; its schema's metadata says which model scored what."""
    from center_embed.score.output import PartWriter, make_schema, scores_metadata

    info = model.info
    model_sha256 = sha256_file(model.path)
    metadata = scores_metadata(model.path, model_sha256, info, source.describe())
    schema = make_schema(info.num_classes, info.embedding_dim, metadata)
    manifest = {"model_sha256": model_sha256, "source": source.describe()}
    return PartWriter(out, fmt, manifest, schema, row_group_size, resume, overwrite)


def _pipeline(model, schema, items: Iterator, batch_size: int, workers: int) -> Iterator[tuple]:
    """(items, errors, Arrow table) per batch, in input order.

    At most 2 * workers batches are in flight (no more, so memory stays flat), and the
    main thread only writes what the workers return.
    """
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="score") as pool:
        batches = _batched(items, batch_size)
        pending = deque(
            pool.submit(_process, model, schema, b) for b in islice(batches, 2 * workers)
        )
        try:
            while pending:
                done = pending.popleft().result()
                following = next(batches, None)
                if following is not None:
                    pending.append(pool.submit(_process, model, schema, following))
                yield done
        finally:  # interrupted: drop the batches not yet started
            for future in pending:
                future.cancel()


def open_scoring_model(path, options: RuntimeOptions | None = None):
    """The model as the workers share it: each runs its own batch on `options.threads`
    threads (0, the default: 1; an onnxruntime session takes concurrent runs, OpenVINO gets
    one stream per core's worth of threads)."""
    from dataclasses import replace

    from center_embed.runtime import OnnxModel, RuntimeOptions

    options = options or RuntimeOptions()
    threads = options.threads or 1
    streams = max(1, (os.cpu_count() or 1) // threads)
    return OnnxModel(path, replace(options, threads=threads), streams=streams)


def default_workers() -> int:
    """One more than the cores: one worker decodes while the others run inference."""
    return (os.cpu_count() or 1) + 1


def _process(model, schema, batch: list) -> tuple[list, list[str | None], Any]:
    images, errors = _decode(model, batch)
    return batch, errors, _score_batch(model, schema, batch, images, errors)


def _skip_written(items: Iterator, done: int, last_id: str | None) -> None:
    """Advance past the rows a previous run wrote, checking the input still agrees."""
    if not done:
        return
    last = deque(islice(items, done), maxlen=1)
    found = last[0].id if last else None
    if found != last_id:
        raise UserError(
            f"cannot resume: row {done} written was {last_id!r} but the input now has "
            f"{found!r} there; the input changed since the interrupted run"
        )


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(items, size)):
        yield batch


def _decode(model, batch: list) -> tuple[np.ndarray, list[str | None]]:
    """(uint8 (k, H, W, 3) of the k images that decoded, error or None per item)."""
    from PIL import Image

    from center_embed.imageio import fit_image
    from center_embed.score.decode import decode_batch, read_image_file

    size = model.info.input_size[0]

    def pixels(item) -> np.ndarray:
        if item.pixels is None:
            return model.decode(read_image_file(item.path))
        if item.pixels.shape == (size, size, 3):
            return item.pixels
        # a dataset stored at another size than the model's input
        return fit_image(Image.fromarray(np.asarray(item.pixels)), size)

    return decode_batch(batch, size, pixels)


def _score_batch(model, schema, batch: list, images: np.ndarray, errors: list[str | None]):
    from center_embed.score.output import rows_table

    if len(images):
        outputs = model.run(images)
    else:  # every image of the batch failed
        outputs = empty_outputs(model.info.num_classes, model.info.embedding_dim)
    return rows_table(
        schema,
        ids=[item.id for item in batch],
        paths=[item.path for item in batch],
        true_classes=[item.true_class for item in batch],
        errors=errors,
        outputs=outputs,
        unknown=model.unknown(outputs),
        class_names=model.info.class_names,
    )


def _count(summary: ScoreSummary, batch: list, errors: list[str | None]) -> None:
    summary.scored += len(batch)
    summary.rows += len(batch)
    for item, error in zip(batch, errors, strict=True):
        if error is not None:
            summary.failed += 1
            if len(summary.failures) < MAX_FAILURES_SHOWN:
                summary.failures.append((item.id, error))


def _progress_bar(total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        disable=not enabled,
        dynamic_ncols=True,
        desc="scoring",
        file=sys.stderr,
    )
