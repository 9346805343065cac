"""The Ray engine's output folder: part files named by input row range, and the run's state.

OUT holds `part-<first>-<last>.parquet` (input rows first..last, inclusive, 0-based,
zero-padded so that sorted names are input order), `_run.json` (what the run scores: resume
checks it), `_inputs/` (manifest.py) and, written last, `_SUCCESS`. A part is written under
a dot-name and renamed when whole (local disks), or uploaded in one object PUT (s3), so a
completed name always holds a readable file; the names alone tell what is done.

Imports numpy, and pyarrow only inside functions; never ray, never torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from center_embed.errors import UserError
from center_embed.score.ray.fs import filesystem, read_text, write_text

RUN_FILE = "_run.json"  # what the run scores (model, inputs, block size): resume checks it
SUCCESS_FILE = "_SUCCESS"  # written last: the dataset is complete


def part_name(first: int, last: int) -> str:
    return f"part-{first:012d}-{last:012d}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    first, _, last = name[len("part-") : -len(".parquet")].partition("-")
    return (int(first), int(last)) if first.isdigit() and last.isdigit() else None


def write_part(fs: Any, root: str, name: str, table: Any) -> None:
    import pyarrow.fs
    import pyarrow.parquet as pq

    if isinstance(fs, pyarrow.fs.LocalFileSystem):  # whole or not at all: write, then rename
        tmp = f"{root}/.{name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, f"{root}/{name}")
    else:  # object stores publish an object only once its upload completes
        pq.write_table(table, f"{root}/{name}", filesystem=fs)


def inside(indices: np.ndarray, ranges: list) -> np.ndarray:
    """True where an index lies in one of the sorted, disjoint (first, last) ranges."""
    if not ranges:
        return np.zeros(len(indices), bool)
    firsts = np.array([r[0] for r in ranges])
    lasts = np.array([r[1] for r in ranges])
    at = np.searchsorted(firsts, indices, side="right") - 1
    return (at >= 0) & (indices <= lasts[np.maximum(at, 0)])


def open_output(out: str, run: dict, resume: bool, overwrite: bool) -> str:
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
        before = json.loads(read_text(out, RUN_FILE))
        changed = sorted(k for k in run if before.get(k) != run[k])
        if changed:
            detail = "; ".join(f"{k}: was {before.get(k)!r}, now {run[k]!r}" for k in changed)
            raise UserError(f"cannot resume {out}, the run differs: {detail}")
        return "complete" if complete else "resume"
    fs.delete_dir_contents(root, missing_dir_ok=True)  # a run killed while listing: start again
    fs.create_dir(root)
    return "new"


def completed_parts(out: str) -> tuple[list[tuple[int, int]], int]:
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


def finish(out: str, total: int) -> None:
    """Check that the parts hold every input row exactly once; then write _SUCCESS."""
    ranges, failed = completed_parts(out)
    expected = 0
    for first, last in ranges:
        if first != expected:
            raise UserError(f"{out}: input rows {expected}..{first - 1} have no part; --resume")
        expected = last + 1
    if expected != total:
        raise UserError(f"{out}: input rows {expected}..{total - 1} have no part; --resume")
    done = {"rows": total, "failed": failed, "parts": len(ranges)}
    write_text(out, SUCCESS_FILE, json.dumps(done, sort_keys=True) + "\n")
