"""The command line: instant help, exit codes, one-line errors; the layers' import rules."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys

import pytest

from center_embed.cli import COMMANDS, build_parser, main
from tests.helpers import ROOT, source_modules


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
        "error: onnxruntime is not installed; pip install '.[cpu]' (in the center-embed clone)\n"
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


# --------------------------------------------------------------------------- layers
#
# The layers, along the flow: the core (center_embed minus the subpackages below) <- training
# <- export <- service, and the CLI on top of all; the service never needs training (a serving
# install has no torch). A dependency is an import statement, an importlib.import_module /
# __import__ call, or any string naming a module (a registry of import strings is a
# dependency too); the subprocess tests below also catch what the static reading cannot.

TRAINING = "center_embed.training"
LAYERS = ("center_embed.cli", "center_embed.service", "center_embed.export", TRAINING)
FORBIDDEN = {  # layer -> the packages its modules must never name
    "core": ("center_embed.cli", "center_embed.export", "center_embed.service", TRAINING),
    TRAINING: ("center_embed.cli", "center_embed.export", "center_embed.service"),
    "center_embed.export": ("center_embed.cli", "center_embed.service"),
    "center_embed.service": ("center_embed.cli", TRAINING),
    "center_embed.cli": (),
}
# The packages that need torch, and every module in them; every other module must import
# without loading it. The CLI adapters import them only inside the commands that need them.
TORCH_MODULES = (TRAINING, "center_embed.export")
MODULE_NAME = re.compile(r"center_embed(\.[A-Za-z_]\w*)+")


def layer_of(module: str) -> str:
    return next((layer for layer in LAYERS if is_within(module, layer)), "core")


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def named_modules(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) imports or names, statically or not."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # import_module("..."), __import__("..."), uvicorn's "pkg.mod:app", registries
            candidate = node.value.split(":")[0]
            if MODULE_NAME.fullmatch(candidate):
                names.add(candidate)
    return names


def test_dependencies_point_one_way():
    """No module names a package of a layer above its own, not even by a string."""
    offences = []
    for module, path in source_modules().items():
        forbidden = FORBIDDEN[layer_of(module)]
        is_package = path.name == "__init__.py"
        for name in named_modules(module, path.read_text(), is_package):
            if any(is_within(name, package) for package in forbidden):
                offences.append(f"{module} -> {name}")
    assert offences == []


def test_the_layer_check_sees_dynamic_imports():
    dynamic = (
        "import importlib\n"
        "def load():\n"
        "    return importlib.import_module('center_embed.service.app')\n"
        "COMMANDS = {'serve': ('center_embed.export.verify', 'help')}\n"
        "from ..service import app\n"
    )
    assert {"center_embed.service.app", "center_embed.export.verify"} <= named_modules(
        "center_embed.score.local", dynamic
    )
    assert "center_embed.service.app" in named_modules("center_embed.score.local", dynamic)
    assert "center_embed.service" in named_modules("center_embed.score.local", dynamic)


def import_one_by_one(modules: list[str], watched: list[str]) -> dict[str, list[str]]:
    """Import `modules` in order in a fresh interpreter: the `watched` names each one loaded.

    A module is blamed only for what was not loaded before it, so the culprit is exact.
    """
    code = (
        "import importlib, json, sys\n"
        f"modules, watched = {modules!r}, {watched!r}\n"
        "loaded = {}\n"
        "for name in modules:\n"
        "    before = {w for w in watched if w in sys.modules}\n"
        "    importlib.import_module(name)\n"
        "    loaded[name] = [w for w in watched if w in sys.modules and w not in before]\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def importable_modules() -> list[str]:
    return [m for m in source_modules() if not m.endswith(".__main__")]  # __main__ runs the CLI


def test_torch_free_modules_never_load_torch():
    torch_free = [
        m
        for m in importable_modules()
        if not any(is_within(m, torch_module) for torch_module in TORCH_MODULES)
    ]
    assert {"center_embed.runtime", "center_embed.score.local", "center_embed.cli"} <= set(
        torch_free
    )
    loaded = import_one_by_one(torch_free, ["torch"])
    assert [m for m in torch_free if loaded[m]] == []


def test_importing_a_layer_never_loads_a_layer_above_it():
    by_layer = {
        layer: [m for m in importable_modules() if layer_of(m) == layer]
        for layer in ("core", TRAINING, "center_embed.export", "center_embed.service")
    }
    # core first, then training, export (service is not loaded yet), then service
    modules = [m for layer in by_layer.values() for m in layer]
    loaded = import_one_by_one(modules, list(LAYERS))
    offences = [
        f"{m} loaded {above}"
        for m in modules
        for above in loaded[m]
        if any(is_within(above, package) for package in FORBIDDEN[layer_of(m)])
    ]
    assert offences == []


def imported_names(node: ast.AST) -> list[str]:
    """The modules an import statement names; a relative one as tests.<dots><module>, so
    that even `from .helpers import x` is not the allowed form."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        return ["tests." + "." * node.level + (node.module or "")]
    if node.module == "tests":  # from tests import conftest
        return [f"tests.{alias.name}" for alias in node.names]
    return [node.module or ""]


def test_test_files_import_only_the_helpers():
    """Under tests/, an import of tests.* names tests.helpers (or tests.attacks, the attack
    set bench_soak.py shares) and nothing else (no test module, no conftest): fixtures
    reach tests through pytest, helpers through one module."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        for name in imported_names(node)
        if name.split(".")[0] == "tests" and name not in ("tests.helpers", "tests.attacks")
    ]
    assert offenders == []
    # The check sees each form a test file could use.
    forms = {
        "from tests.conftest import x": ["tests.conftest"],
        "from tests import test_data": ["tests.test_data"],
        "import tests.training.test_train": ["tests.training.test_train"],
        "from .helpers import y": ["tests..helpers"],
        "from tests.helpers import ROOT": ["tests.helpers"],
    }
    for source, names in forms.items():
        assert imported_names(ast.parse(source).body[0]) == names, source


def test_serve_help_lists_each_setting_once_aligned():
    from center_embed.cli.serve import settings_help

    lines = settings_help().splitlines()[1:]
    assert len(lines) > 20
    assert all(line.count("(default:") == 1 for line in lines), lines
    starts = {len(line) - len(line[2:].split(maxsplit=1)[1]) for line in lines}
    assert len(starts) == 1  # every description starts in one column
    assert any("GRACEFUL_SHUTDOWN_S" in line and "(default: timeout_s + 5)" in line
               for line in lines)  # fmt: skip
