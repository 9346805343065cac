"""Fixtures of the documentation tests: the pages, read once."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT

DOCS = ROOT / "docs"


@pytest.fixture(scope="session")
def pages() -> dict[str, str]:
    """README.md and every docs/*.md page, by path relative to the repository."""
    paths = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}
