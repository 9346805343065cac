"""The answers shown on docs/serving.md have the fields and JSON types of the service's
real answers. Each example is a ```json block preceded by `<!-- response: NAME -->`; NAME
is a request below, sent to the app (create_app, TestClient) serving the tiny model.

Values are illustrative (class names, numbers, vector lengths), so the comparison is of
shape: the same keys (except inside maps keyed by class or metadata name), the same JSON
type for every value (null matching null), lists compared by their first item."""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, encode, tiny_images

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

EXAMPLE = re.compile(r"<!-- response: ([\w-]+) -->\n```json\n(.*?)\n```", re.S)
ADMIN = "docs-admin-key"
FREE_KEYS = {"distances", "metadata", "class_thresholds"}  # maps keyed by names
ABRIDGED = {"metadata"}  # the page shows a few of its keys


def examples() -> dict[str, object]:
    text = (ROOT / "docs" / "serving.md").read_text()
    return {name: json.loads(body) for name, body in EXAMPLE.findall(text)}


@pytest.fixture(scope="module")
def client(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    centers = tmp_path_factory.mktemp("centers") / "centers.npz"
    settings = Settings(model=tiny_onnx, admin_keys=[ADMIN], centers_file=centers)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.02)
        yield client


def files(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", encode(p), "image/png")) for i, p in enumerate(tiny_images(n))]


def answer(client: TestClient, name: str) -> tuple[int, object]:
    admin = {"authorization": f"Bearer {ADMIN}"}
    if name in ("healthz", "readyz"):
        response = client.get(f"/{name}")
    elif name == "classify":
        response = client.post("/v1/classify?top_k=2", files=files(1))
    elif name == "embed":
        response = client.post("/v1/embed", files=files(1))
    elif name == "distances":
        vectors = client.post("/v1/embed", files=files(1)).json()["embeddings"]
        response = client.post("/v1/distances", json={"embeddings": vectors})
    elif name in ("model", "centers"):
        response = client.get(f"/v1/{name}")
    elif name == "enrol":
        response = client.put("/v1/centers/zebra", files=files(3), headers=admin)
    elif name == "remove":
        client.put("/v1/centers/zebra", files=files(3), headers=admin)
        response = client.delete("/v1/centers/zebra", headers=admin)
    elif name == "error":
        bad = [("files", ("x.png", b"not an image", "image/png"))]
        response = client.post("/v1/classify", files=bad)
    else:
        raise AssertionError(f"docs/serving.md shows an answer {name!r} this test cannot ask")
    return response.status_code, response.json()


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return type(value).__name__


def same_shape(shown: object, real: object, where: str, free_keys: bool = False) -> list[str]:
    """Differences between a documented answer and a real one, by path."""
    if json_type(shown) != json_type(real):  # 1 shown where 1.0 is served counts too
        return [f"{where}: shown {json_type(shown)}, served {json_type(real)}"]
    if isinstance(shown, dict) and isinstance(real, dict):
        problems = []
        if free_keys:  # keyed by names: compare the names both have, else any one value
            common = [k for k in shown if k in real]
            if common:
                return [p for k in common for p in same_shape(shown[k], real[k], f"{where}.{k}")]
            pairs = list(zip(shown.values(), real.values(), strict=False))[:1]
            return [p for s, r in pairs for p in same_shape(s, r, f"{where}.*")]
        name = where.rsplit(".", 1)[-1]
        if set(shown) != set(real) and name not in ABRIDGED:
            problems.append(f"{where}: keys shown {sorted(shown)}, served {sorted(real)}")
        for key in set(shown) & set(real):
            free = key in FREE_KEYS
            problems += same_shape(shown[key], real[key], f"{where}.{key}", free)
        return problems
    if isinstance(shown, list) and isinstance(real, list) and shown and real:
        return same_shape(shown[0], real[0], f"{where}[0]")
    return []


def test_the_page_shows_every_answer():
    assert set(examples()) == {
        "healthz",
        "readyz",
        "classify",
        "embed",
        "distances",
        "model",
        "centers",
        "enrol",
        "remove",
        "error",
    }


@pytest.mark.parametrize("name", sorted(examples()))
def test_example_matches_the_service(name: str, client: TestClient):
    status, real = answer(client, name)
    assert status == (400 if name == "error" else 200), real
    shown = examples()[name]
    problems = same_shape(shown, real, name)
    assert not problems, "\n".join(problems) + f"\nserved: {json.dumps(real)[:1500]}"
