"""The README stays short, the results tables stay rendered from their JSON, and the pages
read as documentation, not as a lab notebook."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.helpers import ROOT

README_MAX_LINES = 250

# Words of a diary, not of documentation: when something was measured belongs to the
# results files (rendered with their machine and file), plans to the issue tracker.
DIARY = [
    r"\bthis session\b",
    r"\bmorning\b",
    r"\bevening\b",
    r"\byesterday\b",
    r"\btonight\b",
    r"\bissue\s*#?\d",
    r"\bissue's\b",
    r"\bhelpers?\b(?!\.py)",
    r"\btargets?\b",
    r"\bTODO\b",
    r"\bFIXME\b",
    r"\bXXX\b",
]
# The changelog dates its entries, and that is all it may do of the above.
DIARY_EXEMPT: set[str] = set()


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "docs/render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_results_tables_are_rendered(capsys: pytest.CaptureFixture[str]):
    """What lies between the results markers is what the renderer writes from the JSON."""
    assert load_renderer().main(["--check"]) == 0, capsys.readouterr().out


def test_every_results_marker_is_known(pages: dict[str, str]):
    renderer = load_renderer()
    for page, text in pages.items():
        opened = re.findall(r"<!-- results:([\w-]+) -->", text)
        closed = re.findall(r"<!-- /results:([\w-]+) -->", text)
        assert opened == closed, f"{page}: unbalanced results markers"
        assert set(opened) <= set(renderer.TABLES), f"{page}: {set(opened) - set(renderer.TABLES)}"
    assert "<!-- results:headline -->" in pages["README.md"]


def test_every_rendered_table_names_machine_and_file():
    renderer = load_renderer()
    for name, render in renderer.TABLES.items():
        text = render()
        if "|" not in text:  # no table (e.g. no new-shape file yet)
            continue
        assert "Measured on " in text, name
        assert "benchmarks/results/" in text, name


def test_missing_figures_render_as_not_measured(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """With no service or scoring results file, the README's table says so."""
    renderer = load_renderer()
    for name in ("quality-atypicality-2026-12-01.json",):
        (tmp_path / name).write_text((renderer.RESULTS / name).read_text())
    monkeypatch.setattr(renderer, "RESULTS", tmp_path)
    text = renderer.headline()
    assert text.count(renderer.NOT_MEASURED) == 2
    new = {
        "benchmark": "service",
        "command": "python benchmarks/bench_service.py model.onnx",
        "commit": "0" * 40,
        "date": "2027-01-01",
        "machine": {"cpu": "Test CPU", "flags": ["avx2"], "cores": 2, "gpu": None},
        "results": {"load": {"requests_per_second": 1234.5}},
    }
    (tmp_path / "service-2027-01-01.json").write_text(__import__("json").dumps(new))
    text = renderer.headline()
    assert text.count(renderer.NOT_MEASURED) == 1
    assert "1,234" in text and "Test CPU (avx2), 2 cores, no GPU" in text
    assert "service-2027-01-01.json" in renderer.new_results()


@pytest.mark.parametrize("pattern", DIARY)
def test_no_diary_words(pattern: str, pages: dict[str, str]):
    hits = []
    for page, text in pages.items():
        if page in DIARY_EXEMPT:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(pattern, line, re.IGNORECASE):
                hits.append(f"{page}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
