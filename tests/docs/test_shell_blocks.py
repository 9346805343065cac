"""The README's and the quickstart's tagged code blocks, run as written on tiny data.

A fenced block preceded by `<!-- test: run -->` runs (bash as a shell script, python
through the venv's interpreter), in page order, in one shell, in a temporary folder, with
`DATA` set to a tiny image folder. A block preceded by `<!-- test: serve -->` is a
`center-embed serve` command: it starts in the background on a free port (its `--port
8000`, and every later `127.0.0.1:8000`, become that port), the script waits for
/readyz, and the server is stopped when the script ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, write_image_folder

BLOCK = re.compile(r"<!-- test: (run|serve) -->\n```(bash|python)\n(.*?)\n```", re.S)
TESTED_PAGES = ["README.md", "docs/quickstart.md"]


def blocks(text: str) -> list[tuple[str, str, str]]:
    return [(m[1], m[2], m[3]) for m in BLOCK.finditer(text)]


def script(text: str, port: int) -> str:
    lines = ["set -euo pipefail"]
    for kind, language, code in blocks(text):
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        code = code.replace("localhost:8000", f"localhost:{port}")
        if kind == "serve":
            assert language == "bash" and "center-embed serve" in code, code
            command = code.strip().replace("--port 8000", f"--port {port}")
            lines += [
                f"{command} > serve.log 2>&1 &",
                "SERVER=$!",
                "trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT",
                "for _ in $(seq 300); do",
                f"  curl -sf http://127.0.0.1:{port}/readyz > /dev/null && break",
                "  kill -0 $SERVER 2>/dev/null || { cat serve.log; exit 1; }",
                "  sleep 0.1",
                "done",
            ]
        elif language == "python":
            lines += ["python - <<'PYTHON_BLOCK'", code, "PYTHON_BLOCK"]
        else:
            lines.append(code)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), {"train": 64, "test": 8})


@pytest.mark.parametrize("page", TESTED_PAGES)
def test_tagged_blocks_run(page: str, pages: dict[str, str], data: Path, tmp_path: Path):
    text = pages[page]
    found = blocks(text)
    kinds = {kind for kind, _, _ in found}
    assert found and "serve" in kinds, f"{page} has no tagged blocks to run"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DATA"] = str(data)
    result = subprocess.run(
        ["bash", "-c", script(text, free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"{page}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert '"class_name"' in result.stdout, result.stdout[-2000:]
