"""benchmarks/: short functions, every script's --help without the optional packages, and
the results record that every script writes through benchmarks/_common.py."""

from __future__ import annotations

import ast
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import _common

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))
MAX_LINES = 60
# What the extras bring (torch, the runtimes, the web stack, Ray, Parquet): --help must show
# without any of them, so each is made to fail on import in the --help subprocesses.
OPTIONAL = (
    "torch", "onnx", "onnxscript", "onnxruntime", "openvino", "ray", "pyarrow", "httpx",
    "fastapi", "uvicorn", "pydantic", "simplejpeg", "matplotlib", "tritonclient", "turbojpeg",
)  # fmt: skip
HELP_SECONDS = 30.0  # each; the subprocesses run at once, so the test takes one of them


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 10, SCRIPTS


def test_no_function_in_benchmarks_is_over_60_lines():
    long = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_compiles(script: Path):
    compile(script.read_text(), str(script), "exec")


def test_every_script_shows_help_without_the_optional_packages(tmp_path: Path):
    blocked = tmp_path / "blocked"
    for name in OPTIONAL:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked: --help must not need it')\n"
        )
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    started = time.monotonic()
    running = {
        script.name: subprocess.Popen(
            [sys.executable, str(script.relative_to(BENCHMARKS.parent)), "--help"],
            cwd=BENCHMARKS.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for script in SCRIPTS
    }
    failed = {}
    for name, process in running.items():
        try:
            out, err = process.communicate(timeout=max(1.0, HELP_SECONDS - elapsed(started)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failed[name] = f"no answer in {HELP_SECONDS:g} s"
            continue
        if process.returncode != 0 or not out.startswith("usage:"):
            failed[name] = f"exit {process.returncode}: {err[-1500:]}"
        elif "--json" not in out:
            failed[name] = "no --json option: every benchmark writes its results record"
    assert not failed, failed


def elapsed(started: float) -> float:
    return time.monotonic() - started


def test_results_record_has_the_documented_keys_and_real_machine_facts(tmp_path: Path):
    figures = {"ratio": 1.25, "rounds": [1.0, 1.5]}
    out = _common.write_results("unit", figures, tmp_path / "sub" / "unit.json")
    assert out == tmp_path / "sub" / "unit.json"
    assert [p.name for p in out.parent.iterdir()] == ["unit.json"]  # no temporary file left
    record = json.loads(out.read_text())
    assert set(record) == {"benchmark", "command", "commit", "date", "machine", "results"}
    assert record["benchmark"] == "unit"
    assert record["results"] == figures
    assert record["command"].startswith("python ")
    assert record["command"].split()[1:] == sys.argv[: len(record["command"].split()) - 1]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown|\S+", record["commit"])
    date = datetime.datetime.fromisoformat(record["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - date) < datetime.timedelta(minutes=5)
    machine = record["machine"]
    assert set(machine) == {"cpu", "flags", "cores", "gpu"}
    assert machine["cores"] == os.cpu_count()
    assert isinstance(machine["cpu"], str) and machine["cpu"].strip()
    assert set(machine["flags"]) <= set(_common.CPU_FLAGS)
    assert machine["gpu"] is None or machine["gpu"].strip()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        assert machine["cpu"] in text
        flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
        assert machine["flags"] == [f for f in _common.CPU_FLAGS if f in flags]


def test_results_go_to_the_results_folder_by_name_and_date():
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    assert _common.results_path("soak") == BENCHMARKS / "results" / f"soak-{today}.json"
    assert _common.results_path("soak", "elsewhere.json") == Path("elsewhere.json")


def test_results_record_takes_numpy_values(tmp_path: Path):
    import numpy as np

    out = _common.write_results("unit", {"a": np.float32(0.5), "b": np.arange(3)}, tmp_path / "r")
    assert json.loads(out.read_text())["results"] == {"a": 0.5, "b": [0, 1, 2]}
