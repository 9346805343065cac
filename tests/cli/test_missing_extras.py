"""A command whose optional extra is missing prints one `error:` line naming the extra in
the form that works from a clone (`pip install '.[score]'`), never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from center_embed.cli import EXTRA_FOR_COMMAND_PACKAGE, EXTRA_FOR_PACKAGE
from tests.helpers import ROOT, write_image_folder


def run_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter where importing `module` fails as if not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from center_embed.cli import main\n"
        f"sys.exit(main({list(args)!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_score_without_pyarrow_is_one_error_line(tiny_onnx, tmp_path, fmt):
    images = write_image_folder(tmp_path / "images", {"test": 1})
    out = tmp_path / ("scores.parquet" if fmt == "parquet" else "scores")
    result = run_without(
        "pyarrow", "score", str(tiny_onnx), str(images), "--out", str(out), "--format", fmt
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "error: pyarrow is not installed; pip install '.[score]' (in the center-embed clone)\n"
    )
    assert not out.exists() and not list(tmp_path.glob("scores*.partial"))


def test_every_named_extra_exists_in_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRA_FOR_PACKAGE.values()) <= set(extras)
    assert set(EXTRA_FOR_COMMAND_PACKAGE.values()) <= set(extras)


def test_no_hint_names_the_unpublished_package():
    """`pip install 'center-embed[...]'` fails: the package is not on a registry."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("center_embed", "export", "service")
        for path in (ROOT / folder).rglob("*.py")
        if "center-embed[" in path.read_text()
    ]
    assert offenders == []


def test_report_runs_without_torch(tiny_onnx, tiny_folder, tmp_path):
    """The report reads the ONNX outputs with center_embed.metrics: a serving install with
    the `score` extra writes it, with no torch at all."""
    out = tmp_path / "report"
    result = run_without("torch", "report", str(tiny_onnx), "--data", str(tiny_folder), "--out",
                         str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["onnx"]["map_at_r"] <= 1.0
