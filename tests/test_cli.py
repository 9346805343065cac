"""The command line: instant help, exit codes, one-line errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from center_embed.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "center_embed.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys; from center_embed.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().endswith("False")
    for name in COMMANDS:
        assert name in out.stdout


def test_bad_flag_exits_2():
    result = run_cli("train", "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/nonexistent/data", "--out", "{tmp}/r"], "dataset not found"),
        (["train", "--set", "loss.update=adam", "--out", "{tmp}/r"], "loss.update must be"),
        (["eval", "{tmp}/missing.pt"], "checkpoint not found"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_train_then_eval_from_the_command_line(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(tiny_folder), "--out", str(out)]
    assert main([*args, "--set", "data.val_size=48", "--set", "train.batch_size=32"]) == 0
    printed = capsys.readouterr().out
    assert "nearest-center accuracy" in printed and (out / "eval.json").exists()
    assert main(["eval", str(out / "best.pt"), "--out", str(tmp_path / "e.json")]) == 0
    assert (tmp_path / "e.json").exists()


def test_dependencies_point_one_way():
    """center_embed never imports export or service; export never imports service."""

    def imported(package: str) -> set[str]:
        names = set()
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
        return names

    assert not imported("center_embed") & {"export", "service"}
    assert "service" not in imported("export")
