"""The distribution's modules, found by walking the source folders pyproject.toml installs.

Tests that must cover every module (the dependency rules, the wheel) walk the tree with
these functions, so a new module is covered without editing a list.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """Import name -> source folder, as pyproject.toml's [tool.setuptools.package-dir] maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def source_modules() -> dict[str, Path]:
    """Every module the wheel installs: dotted name -> source file (packages by __init__.py).

    Walks without following symlinks: a worktree's center_embed/export link is the export/
    folder, which package_dirs() maps on its own.
    """
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for directory, subdirs, files in os.walk(folder):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            parts = [package, *Path(directory).relative_to(folder).parts]
            for file in files:
                if file.endswith(".py"):
                    stem = file[: -len(".py")]
                    name = ".".join(parts if stem == "__init__" else [*parts, stem])
                    modules[name] = Path(directory) / file
    return dict(sorted(modules.items()))


def public_modules() -> list[str]:
    """The modules a user may import: no `_private` part, no `__main__` (it runs the CLI)."""
    return [
        name
        for name in source_modules()
        if not any(part.startswith("_") for part in name.split("."))
    ]
