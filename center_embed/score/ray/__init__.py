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

Unreadable images become rows with an `error` (center_embed.score.decode, as in the local
scorer), never a failed task. With --device cpu the decode tasks fuse into the actors (Ray
runs them in the same process, saving a copy); with cuda they stay CPU tasks feeding the
GPU actors.

    fs        local paths and URIs (s3://...) through pyarrow's filesystems
    manifest  the inputs: listed into OUT/_inputs/ by the driver, read back by block
    parts     part file names, writing a part, the run's state (_run.json, _SUCCESS)
    stages    what Ray runs: read_block, ScoreBatches (the actor), write_parts
    driver    score_on_ray: checks, the manifest, the Ray Dataset, the final check

Imports numpy, Pillow, pyarrow and onnxruntime; ray only inside functions (it is the
optional extra `ray`). Never torch.
"""

from center_embed.score.ray.driver import score_on_ray
from center_embed.score.ray.parts import RUN_FILE, SUCCESS_FILE, parse_part_name, part_name
from center_embed.score.ray.stages import ScoreBatches, decode_paths

__all__ = [
    "RUN_FILE",
    "SUCCESS_FILE",
    "ScoreBatches",
    "decode_paths",
    "parse_part_name",
    "part_name",
    "score_on_ray",
]
