"""The wheel: one import name, `center_embed`, and every public module imports from it.

Built from a copy of the source tree (so no stale build/ folder and no worktree symlink can
leak in), installed into a folder of its own, and imported in an interpreter that sees that
folder and the environment's third-party packages only: not the source tree, and not the
editable install's finder (python -S skips the .pth file that installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, package_dirs, public_modules, source_modules

SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")


def copy_source(dest: Path) -> Path:
    """The files the build reads, without symlinks, caches or earlier build output."""
    dest.mkdir()
    for name in SOURCE_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in {path.relative_to(ROOT).parts[0] for path in package_dirs().values()}:
        shutil.copytree(
            ROOT / folder,
            dest / folder,
            ignore=lambda d, names: (
                [n for n in names if (Path(d) / n).is_symlink()] + list(skip(d, names))
            ),
        )
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = copy_source(tmp / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (path,) = (tmp / "dist").glob("center_embed-*.whl")
    return path


def wheel_module_path(module: str, is_package: bool) -> str:
    return module.replace(".", "/") + ("/__init__.py" if is_package else ".py")


def test_the_wheel_claims_one_import_name_and_holds_every_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["center_embed"]
    dist_info = top_level.split("/")[0]
    assert {name.split("/")[0] for name in names} == {"center_embed", dist_info}
    expected = {
        wheel_module_path(module, path.name == "__init__.py")
        for module, path in source_modules().items()
    }
    assert {n for n in names if n.endswith(".py")} == expected


def test_every_public_module_imports_from_an_install_of_the_wheel(wheel, tmp_path):
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    modules = public_modules()
    code = (
        "import importlib, json, sys\n"
        f"files = {{m: importlib.import_module(m).__file__ for m in {modules!r}}}\n"
        "print(json.dumps(files))\n"
    )
    site_packages = sysconfig.get_paths()["purelib"]  # third-party packages only
    env = {"PYTHONPATH": f"{target}:{site_packages}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-S", "-P", "-c", code],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout.splitlines()[-1])
    assert sorted(files) == sorted(modules)
    outside = {m: f for m, f in files.items() if not Path(f).is_relative_to(target)}
    assert outside == {}
