"""`score --engine ray` on a small input: one note that suggests --engine local, and none of
the warnings that are the engine's to avoid (Ray's token-auth notice for a Ray the engine
starts itself, an actor pool larger than its blocks, Ray Data's progress-bar notice).

The unit tests run without a Ray; the end-to-end one starts a local Ray in a subprocess
(seconds), so it is marked slow.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from center_embed.score.ray import driver
from tests.helpers import ROOT

ray = pytest.importorskip("ray")


def test_a_small_input_gets_one_note_suggesting_the_local_engine(capsys):
    driver._note_small_input(driver.SMALL_INPUT - 1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"note: {driver.SMALL_INPUT - 1} images")
    assert "--engine local" in captured.err
    driver._note_small_input(driver.SMALL_INPUT)
    assert capsys.readouterr().err == ""


def test_the_auth_notice_filter_drops_only_that_notice(caplog):
    logger = logging.getLogger(driver.AUTH_LOGGER)
    with caplog.at_level(logging.INFO, logger=driver.AUTH_LOGGER):
        with driver._dropping(driver.AUTH_LOGGER, driver.AUTH_NOTICE):
            logger.warning(driver.AUTH_NOTICE + ". Set RAY_AUTH_MODE=disabled to opt out.")
            logger.warning("Token authentication is enabled but no token was found")
        logger.warning(driver.AUTH_NOTICE + " (after the block)")
    assert [r.getMessage() for r in caplog.records] == [
        "Token authentication is enabled but no token was found",
        driver.AUTH_NOTICE + " (after the block)",
    ]


def test_only_a_ray_started_here_counts_as_local(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert driver._starts_local_ray("local")
    assert not driver._starts_local_ray("auto")
    assert not driver._starts_local_ray("10.1.2.3:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # joins that cluster, starts none
    assert not driver._starts_local_ray(None)


@pytest.mark.slow
def test_the_cli_on_a_small_folder_prints_the_note_and_no_warnings_of_ours(
    tiny_onnx, tiny_folder, tmp_path
):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    images = tmp_path / "images"
    shutil.copytree(tiny_folder / "test", images)  # 48 images: one block of 64 rows
    out = tmp_path / "scores"
    command = [sys.executable, "-m", "center_embed.cli", "score", str(tiny_onnx), str(images),
               "--out", str(out), "--engine", "ray", "--row-group-size", "64",
               "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "48 rows, 0 failed" in done.stdout
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "48 images" in notes[0] and "--engine local" in notes[0]
    assert driver.AUTH_NOTICE not in done.stderr  # token auth stays on, the notice goes
    assert "minimum number of concurrent actors" not in done.stderr
    assert "Progress bars disabled" not in done.stderr
    assert sorted(p.name for p in Path(out).glob("part-*.parquet")) == [
        "part-000000000000-000000000047.parquet"
    ]
