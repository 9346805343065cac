"""What the service promises about itself: the OpenAPI document matches the committed
copy, no torch (nor onnx) is imported, error codes come from one table, and routes reach
the app's state only through service/deps.py (so a test can override each dependency)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings
from tests.helpers import (
    API_KEY,
    answer,
    error,
    expected,
    running,
)

OPENAPI_COPY = Path(__file__).parent / "openapi.json"


def test_openapi_matches_committed_copy(client):
    served = client.get("/openapi.json").json()
    if os.environ.get("CENTER_EMBED_UPDATE_OPENAPI"):
        OPENAPI_COPY.write_text(json.dumps(served, indent=2, sort_keys=True) + "\n")
    assert served == json.loads(OPENAPI_COPY.read_text()), (
        "the API changed: review it, then CENTER_EMBED_UPDATE_OPENAPI=1 pytest "
        "tests/service/test_contracts.py -k openapi"
    )


def test_service_never_imports_torch(tiny_onnx, images):
    code = f"""
import sys
from fastapi.testclient import TestClient
from center_embed.service.app import create_app
from center_embed.service.settings import Settings
import center_embed.cli.serve, center_embed.service.client
app = create_app(Settings(model={str(tiny_onnx)!r}))
with TestClient(app) as client:
    while client.get("/readyz").status_code != 200:
        pass
    files = [("files", ("a.png", {images[0]!r}, "image/png"))]
    assert client.post("/v1/classify", files=files).status_code == 200
print("torch" in sys.modules, "onnx" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def service_sources() -> dict[str, ast.Module]:
    import center_embed.service

    root = Path(center_embed.service.__path__[0])
    return {str(f.relative_to(root)): ast.parse(f.read_text()) for f in root.rglob("*.py")}


def test_error_codes_are_written_once():
    """Every code and status comes from the table: no error code as a string literal
    anywhere else in the service, every ApiError built from an ErrorCode member, and every
    status of the table has its meaning."""
    from center_embed.service.error_codes import STATUS_MEANINGS, ErrorCode

    codes = {code.value for code in ErrorCode}
    assert len(codes) == len(ErrorCode)
    assert {code.status for code in ErrorCode} <= set(STATUS_MEANINGS)
    raised = 0
    for name, tree in service_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and name != "error_codes.py":
                assert node.value not in codes, f"{name}:{node.lineno}: {node.value!r}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ApiError":
                first = node.args[0]
                assert isinstance(first, ast.Attribute | ast.Name), f"{name}:{node.lineno}"
                if isinstance(first, ast.Attribute):
                    assert first.value.id == "ErrorCode" and first.attr in ErrorCode.__members__
                raised += 1
    assert raised >= 20


def test_routes_reach_app_state_only_through_deps():
    """Routes declare their dependencies; none reaches into app.state by hand. Only the app
    (its lifespan) sets the state, and deps.py reads it."""

    def app_state(node: ast.AST) -> bool:  # `app.state` or `request.app.state`
        if not (isinstance(node, ast.Attribute) and node.attr == "state"):
            return False
        owner = node.value
        return getattr(owner, "id", None) == "app" or getattr(owner, "attr", None) == "app"

    touching = {
        name for name, tree in service_sources().items() if any(map(app_state, ast.walk(tree)))
    }
    assert touching == {"app.py", "deps.py"}
    deps_tree = service_sources()["deps.py"]
    stores = [n for n in ast.walk(deps_tree) if isinstance(n, ast.Attribute)
              and isinstance(n.ctx, ast.Store)]  # fmt: skip
    assert not stores


def test_dependencies_can_be_overridden(tiny_onnx, reference, images):
    """Each route takes what it uses from service/deps.py, so a test can swap it."""
    from center_embed.service import deps
    from center_embed.service.security import KeyChecker

    with running(tiny_onnx, api_keys=[API_KEY], max_vectors=4) as client:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        overrides = client.app.dependency_overrides
        served = client.app.state.model
        shifted = ServedModel(served.model, served.centers + 1.0, served.sha256)
        overrides[deps.get_model] = lambda: shifted
        body = client.get("/v1/centers", headers=auth).json()
        np.testing.assert_allclose([c["center"] for c in body["centers"]], shifted.centers)
        vectors = expected(reference, images[:2])["embeddings"]
        response = client.post("/v1/distances", json={"embeddings": vectors.tolist()}, headers=auth)
        ours = [[r["distances"][name] for name in reference.info.class_names]
                for r in response.json()["results"]]  # fmt: skip
        np.testing.assert_allclose(ours, shifted.distances(vectors)["distances"], rtol=1e-5)

        overrides[deps.get_settings] = lambda: Settings(model=tiny_onnx, max_vectors=1)
        response = client.post("/v1/distances", json={"embeddings": vectors.tolist()}, headers=auth)
        assert answer(response) == error(
            413, "too_many_vectors", "2 vectors in one request; at most 1"
        )

        overrides[deps.get_key_checker] = lambda: KeyChecker([b"another-key"])
        assert answer(client.get("/v1/model", headers=auth)) == error(
            401, "unauthorized", "invalid API key"
        )
        other = {"Authorization": "Bearer another-key"}
        assert client.get("/v1/model", headers=other).json()["limits"]["max_vectors"] == 1

        overrides.clear()
        assert client.get("/v1/model", headers=auth).json()["limits"]["max_vectors"] == 4
        body = client.get("/v1/centers", headers=auth).json()
        np.testing.assert_array_equal([c["center"] for c in body["centers"]], served.centers)
