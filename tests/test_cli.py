"""The command line: instant help, exit codes, one-line errors; the layers' import rules."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from center_embed.cli import COMMANDS, build_parser, main

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
    for name, command in COMMANDS.items():  # a line of its own: name, then its help
        assert re.search(rf"^ +{name} +{re.escape(command.help[:20])}", out.stdout, re.M), name


def test_every_command_has_an_adapter_in_the_cli_package():
    for name, command in COMMANDS.items():
        adapter = command.load()
        assert adapter.__name__.startswith("center_embed.cli."), name
        assert callable(getattr(adapter, f"add_{name}_arguments")), name
        assert callable(getattr(adapter, f"run_{name}")), name


def subcommand_actions(name: str) -> dict[str, argparse.Action]:
    parser = build_parser(name)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in subparsers.choices[name]._actions}


def test_shared_flags_have_one_default_and_one_help():
    seen: dict[str, set] = {"device": set(), "threads": set(), "batch_size": set()}
    data_help = set()
    for name in COMMANDS:
        actions = subcommand_actions(name)
        for dest, defaults in seen.items():
            if dest in actions and not (name == "train" and dest == "device"):
                defaults.add(actions[dest].default)
        if "data" in actions:
            data_help.add(actions["data"].help.split(" (default")[0])
    assert seen == {"device": {"auto"}, "threads": {0}, "batch_size": {256}}
    assert data_help == {"dataset: an image folder or a CIFAR-10 archive"}
    # train's --device overrides the config's train.device only when given
    assert subcommand_actions("train")["device"].default is None


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    import center_embed.cli.export as adapter

    def run_inspect(args):
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

    monkeypatch.setattr(adapter, "run_inspect", run_inspect)
    assert main(["inspect", "model.onnx"]) == 1
    assert capsys.readouterr().err == (
        "error: onnxruntime is not installed; pip install 'center-embed[cpu]'\n"
    )


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
