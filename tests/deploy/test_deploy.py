"""deploy/: the KServe manifests against the fields KServe requires, and the Dockerfile's key
lines against the service they run. (No cluster and no image build here: these are the
checks that can run.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from center_embed.service.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # InferenceService names
PORT = 8000


def manifest(name: str) -> dict:
    (document,) = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert document["apiVersion"] == "serving.kserve.io/v1beta1"
    assert document["kind"] == "InferenceService"
    assert DNS_LABEL.match(document["metadata"]["name"])
    predictor = document["spec"]["predictor"]
    assert ("model" in predictor) != ("containers" in predictor), "one model or containers"
    return predictor


def service_routes() -> set[str]:
    from center_embed.service.app import create_app

    app = create_app(Settings(model=Path("unused.onnx")))  # routes only; no lifespan runs
    return set(app.openapi()["paths"])


def test_kserve_triton_runtime_manifest():
    model = manifest("kserve-triton.yaml")["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2"
    assert re.match(r"^(gs|s3|pvc|https?)://", model["storageUri"])


def test_kserve_own_container_manifest():
    predictor = manifest("kserve-service.yaml")
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert re.match(r"^(gs|s3|pvc|https?)://", env["STORAGE_URI"])
    assert env["CENTER_EMBED_MODEL"].startswith("/mnt/models/")  # where KServe downloads to
    for name in env:  # every CENTER_EMBED_* variable is a real setting
        if name.startswith("CENTER_EMBED_"):
            assert name.removeprefix("CENTER_EMBED_").lower() in Settings.model_fields, name
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": PORT}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": PORT}
    assert {"/healthz", "/readyz"} <= service_routes()
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] != 0


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def instructions(lines: list[str], keyword: str) -> list[str]:
    return [line[len(keyword) :].strip() for line in lines if line.startswith(keyword + " ")]


def test_dockerfile_key_lines(dockerfile):
    assert instructions(dockerfile, "FROM") == ["python:3.11-slim"]
    (install,) = [r for r in instructions(dockerfile, "RUN") if "pip install" in r]
    # No torch in the image; OpenVINO beside onnxruntime, for `--runtime auto` to choose.
    assert '".[serve,cpu,openvino]"' in install and "train" not in install
    (user,) = instructions(dockerfile, "USER")
    assert user not in ("root", "0")
    assert any(f"--uid {user}" in r for r in instructions(dockerfile, "RUN"))
    assert instructions(dockerfile, "EXPOSE") == [str(PORT)]
    assert instructions(dockerfile, "VOLUME") == ["/mnt/models"]
    env = " ".join(instructions(dockerfile, "ENV"))
    assert "CENTER_EMBED_MODEL=/mnt/models/model.onnx" in env
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    assert f"http://127.0.0.1:{PORT}/readyz" in healthcheck
    (command,) = instructions(dockerfile, "CMD")
    assert "center-embed serve" in command and f"--port {PORT}" in command
    assert "--host 0.0.0.0" in command
    for copied in instructions(dockerfile, "COPY"):  # every source it copies exists
        for source in copied.split()[:-1]:
            assert (DEPLOY.parent / source).exists(), source
