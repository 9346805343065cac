"""`score_on_ray`: the driver of the Ray engine (the package docstring says how it runs).

Imports ray only inside functions (it is the optional extra `ray`); never torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from center_embed.errors import UserError
from center_embed.fileio import sha256_file
from center_embed.score.ray.fs import read_text, write_text
from center_embed.score.ray.manifest import open_inputs, write_manifest
from center_embed.score.ray.parts import (
    RUN_FILE,
    SUCCESS_FILE,
    completed_parts,
    finish,
    inside,
    open_output,
)
from center_embed.score.ray.stages import ScoreBatches, model_schema, read_block, write_parts

if TYPE_CHECKING:
    from center_embed.runtime import RuntimeOptions

RETRIES = 3  # Ray retries of a task, restarts of an actor and retries of its calls
# No CPU reserved for the light stages (listing rows, writing parts): actors that hold
# every CPU would otherwise starve them (measured: the run hangs).
LIGHT_CPUS = 0
# Below this many images, starting Ray and its actors likely costs more than they save:
# the driver says so and suggests --engine local, but scores on Ray as asked. Measured on
# 2 CPUs: Ray's fixed cost (a local Ray, worker processes, actors) is about 10 s, the
# time --engine local takes for ~1,500 images of a model that scores 150 images/s.
SMALL_INPUT = 2000
# What Ray 2.59+ logs when a ray.init() that starts a local Ray turns token auth on by
# default (RAY_AUTH_MODE unset); _connect keeps the token auth and drops the notice.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


def score_on_ray(
    model: str | Path,
    input: str,
    out: str,
    *,
    options: RuntimeOptions | None = None,
    address: str | None = None,
    actors: int = 0,
    batch_size: int = 256,
    rows_per_block: int = 2048,
    resume: bool = False,
    overwrite: bool = False,
    all_files: bool = False,
    progress: bool = True,
):
    """Score every input image into the Parquet dataset `out`; see the package docstring.

    Connects to the Ray cluster at `address` ("auto": the one this machine belongs to), or
    to the one already initialised in this process, or starts a local one. `options`: the
    actors' device (auto: cuda where the cluster has GPUs, else cpu) and intra-op threads
    (0: 1); runtime and precision are not used. Returns a
    center_embed.score.local.ScoreSummary.
    """
    from center_embed.runtime import RuntimeOptions

    options = options or RuntimeOptions()
    if batch_size < 1 or rows_per_block < 1 or actors < 0 or options.threads < 0:
        raise UserError("--batch-size and --row-group-size must be positive, --actors >= 0")
    driver_model, size = _open_driver_model(model)
    _connect(address)
    actor_options = RuntimeOptions(
        device=_resolve_device(options.device), threads=options.threads or 1
    )
    describe, rows = open_inputs(input, all_files)
    run = _run_description(driver_model, describe, rows_per_block)
    state = open_output(out, run, resume, overwrite)
    if state == "complete":
        done = json.loads(read_text(out, SUCCESS_FILE))
        return _summary(out, done["rows"], done["failed"])
    start = time.perf_counter()
    if state == "new":
        run["rows"] = write_manifest(rows, out, rows_per_block)
        write_text(out, RUN_FILE, json.dumps(run, indent=2, sort_keys=True))
        _note_small_input(run["rows"])
    total = json.loads(read_text(out, RUN_FILE))["rows"]
    covered, failed = completed_parts(out)
    resumed = sum(last - first + 1 for first, last in covered)
    summary = _summary(out, resumed, failed)
    schema = model_schema(driver_model, describe)
    dataset = _pipeline(out, model, schema, describe, size, total, covered, actor_options,
                        actors, batch_size, rows_per_block)  # fmt: skip
    _consume(dataset, summary, total, progress)
    summary.seconds = time.perf_counter() - start
    finish(out, total)
    return summary


def _note_small_input(rows: int) -> None:
    """One line on stderr when the input is too small for Ray to pay off (not a switch)."""
    if rows < SMALL_INPUT:
        print(
            f"note: {rows} images is a small input for --engine ray: below about "
            f"{SMALL_INPUT}, starting Ray and its actors (seconds) likely takes longer than "
            f"scoring them with --engine local; scoring on Ray, as asked",
            file=sys.stderr,
        )


def _connect(address: str | None) -> None:
    """Join the Ray of this process, or the cluster at `address`, or start a local one.

    A local Ray started here keeps Ray's default of token auth, without Ray's notice that
    it turned it on: RAY_AUTH_MODE=token in the environment would say the same, but Ray
    reads it when ray is imported (set later, ray.init fails: InvalidAuthToken), and the
    CLI has imported ray by now. A user's RAY_AUTH_MODE or cluster is left as it is.
    """
    import ray

    if ray.is_initialized():
        return
    quiet = "RAY_AUTH_MODE" not in os.environ and _starts_local_ray(address)
    with _dropping(AUTH_LOGGER, AUTH_NOTICE) if quiet else contextlib.nullcontext():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def _starts_local_ray(address: str | None) -> bool:
    """Whether ray.init(address) starts a new Ray on this machine (rather than joining one:
    RAY_ADDRESS, a `ray start` here); False when that cannot be told."""
    if address == "local":
        return True
    if address is not None:
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # Ray's internals moved: leave Ray's notice in place
        return False


@contextlib.contextmanager
def _dropping(logger_name: str, prefix: str):
    """Within the block, records of that logger whose message starts with `prefix` are
    dropped; every other record passes."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _summary(out: str, rows: int, failed: int):
    """The ScoreSummary of a run whose `rows` rows are written (`out` stays a str: a URI)."""
    from center_embed.score.local import ScoreSummary

    return ScoreSummary(out, rows, failed, 0, 0, 0.0, resumed_from=rows)  # type: ignore[arg-type]


def _run_description(driver_model, describe: dict, rows_per_block: int) -> dict:
    """What the run scores, as _run.json keeps it: --resume continues only the same run."""
    from center_embed.score.output import SCORES_FORMAT_VERSION, TRUE_CLASS_RULE

    return {
        "format_version": SCORES_FORMAT_VERSION,
        "model_sha256": sha256_file(driver_model.path),
        "source": describe,
        "rows_per_block": rows_per_block,
        "true_class": TRUE_CLASS_RULE,  # a run from before the folder rule is not resumed
    }


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


def _pipeline(out, model, schema, describe, size, total, covered, options, actors,
              batch_size, rows_per_block):  # fmt: skip
    """The lazy Ray Dataset of write summaries for the blocks not yet fully written."""
    import ray

    blocks = [
        b for b in range(-(-total // rows_per_block))
        if not inside(np.arange(b * rows_per_block, min(total, (b + 1) * rows_per_block)),
                      covered).all()
    ]  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts rows, not Ray's blocks
    gpu = options.device == "cuda"
    if actors == 0:
        actors = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)) or 1
    actors = max(1, min(actors, len(blocks)))  # an actor without a block would only idle
    with open(model, "rb") as f:
        # The bytes go to the actors (they need no shared filesystem) through the object
        # store, by reference: the pipeline Ray serialises stays small whatever the model.
        model_ref = ray.put(f.read())
    _quiet_disabled_progress_bars()
    with warnings.catch_warnings():  # Ray 2.60 deprecates retry kwargs but names no successor
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _stages(out, model_ref, schema, describe, size, covered, blocks, options,
                       actors, batch_size, rows_per_block)  # fmt: skip


def _quiet_disabled_progress_bars() -> None:
    """Ray Data warns once per process that its progress bars are off; we turned them off
    (ours counts rows), so the warning is spent here. Ray keys it by this name; should the
    key change, the warning just shows again."""
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


def _stages(out, model_ref, schema, describe, size, covered, blocks, options, actors,
            batch_size, rows_per_block):  # fmt: skip
    import ray

    gpu = options.device == "cuda"
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
        fn_constructor_kwargs={"model": model_ref, "options": options, "schema": schema,
                               "source": describe},
    )  # fmt: skip
    return dataset.map_batches(
        write_parts, batch_size=None, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
        max_retries=RETRIES, fn_kwargs={"out": out, "schema": schema},
    )  # fmt: skip


def _consume(dataset, summary, total: int, progress: bool) -> None:
    """Run the pipeline, counting rows and failures from the write summaries."""
    from center_embed.score.local import MAX_FAILURES_SHOWN, _progress_bar

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
