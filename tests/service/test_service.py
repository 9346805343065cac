"""The HTTP service: the real app, a real exported model, through its HTTP interface.

Every answer is compared with onnxruntime run directly on the same decoded pixels; every
bad input gets its exact status code and JSON error.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from center_embed import contract
from center_embed.errors import UserError
from center_embed.runtime import OnnxModel, RuntimeOptions, describe
from center_embed.service.app import create_app
from center_embed.service.batcher import BatchTimeout, MicroBatcher, QueueFull
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings
from tests.helpers import (
    API_KEY,
    encode,
    free_port,
    png_bomb,
    serve_in_thread,
    tiny_images,
)

with warnings.catch_warnings():  # starlette's notice that its TestClient will move to httpx2
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

OPENAPI_COPY = Path(__file__).parent / "openapi.json"
JSON_TYPE = {"content-type": "application/json"}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def running(
    model_path: Path, served: ServedModel | None = None, wait_ready: bool = True, **settings
) -> Iterator[TestClient]:
    """The app with these settings, its lifespan run, ready unless told not to wait."""
    app = create_app(Settings(model=model_path, **settings), model=served)
    with TestClient(app) as client:
        deadline = time.monotonic() + 20
        while wait_ready and client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.01)
        yield client


class Gate:
    """Wraps a ServedModel's run so a test decides when each batch may run."""

    def __init__(self, served: ServedModel, is_open: bool = True) -> None:
        self.opened, self.entered = threading.Event(), threading.Event()
        self.batches: list[int] = []
        if is_open:
            self.opened.set()
        inner = served.run

        def run(images: np.ndarray):
            self.entered.set()
            self.batches.append(len(images))
            assert self.opened.wait(30), "gate never opened"
            return inner(images)

        served.run = run


def expected(reference, files: list[bytes]) -> dict[str, np.ndarray]:
    """onnxruntime directly on the same decoded pixels."""
    return reference.run(np.stack([reference.decode(data) for data in files]))


def multipart(*files: bytes, names: list[str] | None = None) -> list[tuple]:
    names = names or [f"image{i}.png" for i in range(len(files))]
    parts = zip(names, files, strict=True)
    return [("files", (name, data, "application/octet-stream")) for name, data in parts]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(status: int, code: str, message: str) -> tuple[int, dict]:
    return status, {"error": {"code": code, "message": message}}


def answer(response: httpx.Response) -> tuple[int, dict]:
    return response.status_code, response.json()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Five images of several formats and sizes (resize and crop paths included)."""
    pixels = tiny_images(4)
    wide = np.asarray(Image.fromarray(tiny_images(1, seed=7, size=48)[0]).crop((0, 0, 48, 40)))
    return [
        encode(pixels[0]),
        encode(pixels[1], "JPEG", quality=95),
        encode(pixels[2], "BMP"),
        encode(pixels[3], "WEBP", lossless=True),
        encode(wide),
    ]


@pytest.fixture(scope="module")
def client(tiny_onnx) -> Iterator[TestClient]:
    with running(tiny_onnx, max_images=8, max_vectors=4, max_body_bytes=256 * 1024) as c:
        yield c


# --------------------------------------------------------------------------- answers


def check_results(
    results: list[dict], ref: dict[str, np.ndarray], names: list[str], vectors: bool = False
) -> None:
    assert len(results) == len(ref["labels"])
    for i, result in enumerate(results):
        assert result["label"] == int(ref["labels"][i])
        assert result["class_name"] == names[ref["labels"][i]]
        assert result["min_distance"] == pytest.approx(float(ref["min_distances"][i]), rel=1e-5)
        distances = [result["distances"][name] for name in names]
        np.testing.assert_allclose(distances, ref["distances"][i], rtol=1e-5, atol=1e-6)
        assert list(result["distances"].values()) == sorted(result["distances"].values())
        if vectors:
            assert "atypicality" not in result  # a bare vector has no image
        else:
            assert result["atypicality"] == pytest.approx(float(ref["atypicality"][i]), abs=1e-4)


def test_classify_agrees_with_onnxruntime(client, reference, images):
    ref = expected(reference, images)
    names = reference.info.class_names
    threshold = reference.info.unknown_threshold
    response = client.post("/v1/classify", files=multipart(*images))
    assert response.status_code == 200
    body = response.json()
    check_results(body["results"], ref, names)
    # The flag uses the nearest class's own threshold (per-class calibration).
    flags = reference.info.unknown(ref["min_distances"], ref["labels"])
    for result, flag in zip(body["results"], flags, strict=True):
        assert result["unknown"] == bool(flag)
        assert "embedding" not in result
    assert body["model"]["embedding_dim"] == reference.info.embedding_dim
    assert body["model"]["unknown_threshold"] == threshold
    assert body["model"]["provider"] == "CPUExecutionProvider"
    assert float(response.headers["x-queue-time"]) >= 0
    assert float(response.headers["x-inference-time"]) > 0

    # The same images as JSON base64 (one as a data URI), with embeddings and top_k.
    payload = {"images": [b64(images[0]), f"data:image/png;base64,{b64(images[0])}"]}
    response = client.post("/v1/classify?top_k=2&return_embeddings=true", json=payload)
    assert response.status_code == 200
    results = response.json()["results"]
    for result in results:
        assert len(result["distances"]) == 2
        nearest = sorted(ref["distances"][0])[:2]
        np.testing.assert_allclose(list(result["distances"].values()), nearest, rtol=1e-5)
        assert next(iter(result["distances"])) == result["class_name"]
        np.testing.assert_allclose(result["embedding"], ref["embeddings"][0], rtol=1e-5, atol=1e-6)
    big_k = client.post("/v1/classify?top_k=1000", files=multipart(images[0])).json()
    assert len(big_k["results"][0]["distances"]) == len(names)


def test_embed_agrees_with_onnxruntime(client, reference, images):
    ref = expected(reference, images)
    for request in ({"files": multipart(*images)}, {"json": {"images": [b64(x) for x in images]}}):
        response = client.post("/v1/embed", **request)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"embeddings", "dim"}
        assert body["dim"] == reference.info.embedding_dim
        np.testing.assert_allclose(body["embeddings"], ref["embeddings"], rtol=1e-5, atol=1e-6)
        assert "x-queue-time" in response.headers and "x-inference-time" in response.headers


def metric_value(exposition: str, name: str) -> float:
    """The value of an unlabelled sample `name` in a Prometheus text exposition."""
    line = next(x for x in exposition.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_distances_agree_with_onnxruntime(client, reference, images):
    """A bare embedding has no image, so no atypicality: its distances are the image's
    less the image's atypicality (a flat colour has one: the tiny model gives it ~100)."""
    flat = encode(np.full((32, 32, 3), (10, 200, 30), np.uint8))
    ref = expected(reference, [*images[:3], flat])
    assert ref["atypicality"][3] > 1  # (the JPEG one has some too: artefacts on noise)
    counted = "center_embed_atypical_total"
    before = metric_value(client.get("/metrics").text, counted)
    classified = client.post("/v1/classify", files=multipart(*images[:3], flat)).json()
    check_results(classified["results"], ref, reference.info.class_names)
    after = metric_value(client.get("/metrics").text, counted)
    assert after - before == int((ref["atypicality"] > 0).sum()) >= 1  # a drift signal
    payload = {"embeddings": ref["embeddings"].tolist()}
    response = client.post("/v1/distances", json=payload)
    assert response.status_code == 200
    bare = {**ref, "distances": ref["distances"] - ref["atypicality"][:, None]}
    bare["min_distances"] = bare["distances"].min(1)
    check_results(response.json()["results"], bare, reference.info.class_names, vectors=True)
    assert float(response.headers["x-queue-time"]) == 0
    assert float(response.headers["x-inference-time"]) > 0
    top1 = client.post("/v1/distances?top_k=1", json=payload).json()["results"]
    assert [list(r["distances"]) for r in top1] == [[r["class_name"]] for r in top1]


def test_a_file_without_atypicality_is_served_as_before(tiny_plain_onnx, images):
    """Four outputs (every file exported before the atypicality): /v1 answers with an
    atypicality of 0, /v2 declares and serves the four outputs only."""
    reference = OnnxModel(tiny_plain_onnx, RuntimeOptions(device="cpu"))
    ref = expected(reference, images[:3])
    with running(tiny_plain_onnx) as client:
        results = client.post("/v1/classify", files=multipart(*images[:3])).json()["results"]
        meta = client.get("/v2/models/center_embed").json()
        image = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}
        asked = {"inputs": [image], "outputs": [{"name": "atypicality"}]}
        refused = client.post("/v2/models/center_embed/infer", json=asked)
    check_results(results, ref, reference.info.class_names)
    assert [r["atypicality"] for r in results] == [0.0] * 3
    assert [o["name"] for o in meta["outputs"]] == list(contract.OUTPUT_NAMES)
    assert refused.status_code == 400 and "unknown output(s) ['atypicality']" in refused.text


def test_model_and_centers(client, reference, tiny_onnx):
    import onnx
    from onnx import numpy_helper

    body = client.get("/v1/model").json()
    assert body["metadata"] == describe(reference.info)
    assert body["provider"] == "CPUExecutionProvider"
    assert body["limits"]["max_images"] == 8 and body["limits"]["max_vectors"] == 4
    assert body["model"]["num_classes"] == len(reference.info.class_names)

    graph = onnx.load(tiny_onnx).graph
    centers = next(numpy_helper.to_array(i) for i in graph.initializer if i.name == "centers")
    body = client.get("/v1/centers").json()
    assert body["dim"] == reference.info.embedding_dim
    assert [c["class_name"] for c in body["centers"]] == reference.info.class_names
    assert [c["label"] for c in body["centers"]] == list(range(len(centers)))
    np.testing.assert_array_equal([c["center"] for c in body["centers"]], centers)


def test_read_centers_without_onnx(tmp_path):
    """The wire-format reader against onnx's own writer: raw_data, float_data, float16."""
    import onnx
    from onnx import TensorProto, helper

    from center_embed.contract import read_centers

    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    for tensor in (
        helper.make_tensor("centers", TensorProto.FLOAT, [3, 4], values.tobytes(), raw=True),
        helper.make_tensor("centers", TensorProto.FLOAT, [3, 4], values.ravel().tolist()),
        helper.make_tensor(
            "centers", TensorProto.FLOAT16, [3, 4], values.astype(np.float16).tobytes(), raw=True
        ),
    ):
        other = helper.make_tensor("other", TensorProto.FLOAT, [2], [1.0, 2.0])
        node = helper.make_node("Identity", ["x"], ["y"])
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
        graph = helper.make_graph([node], "g", io[:1], io[1:], initializer=[other, tensor])
        path = tmp_path / "m.onnx"
        onnx.save(helper.make_model(graph), path)
        np.testing.assert_allclose(read_centers(path), values, rtol=1e-3)
        with pytest.raises(UserError, match="no 'absent' initializer"):
            read_centers(path, "absent")


# --------------------------------------------------------------------------- bad input


CORRUPT = encode(tiny_images(1)[0])[:60]


@pytest.mark.parametrize(
    ("request_args", "status", "code", "message"),
    [
        pytest.param(
            {"files": multipart(b"hello, I am text\n", names=["notes.txt"])},
            400, "bad_image", 'files[0] ("notes.txt"): not an image format Pillow can read',
            id="text-file",
        ),
        pytest.param(
            {"files": multipart(b"", names=["empty.png"])},
            400, "bad_image", 'files[0] ("empty.png") is empty', id="empty-file",
        ),
        pytest.param(
            {"files": multipart(png_bomb(5000, 5000), names=["bomb.png"])},
            413, "image_too_large",
            'files[0] ("bomb.png"): image is 5000x5000 pixels, more than the limit of 16777216',
            id="image-bomb",
        ),
        pytest.param(
            {"files": multipart(*[b"x"] * 9)},
            413, "too_many_images", "more than 8 images in one request; at most 8",
            id="too-many-files",
        ),
        pytest.param(
            {"json": {"images": ["eA=="] * 9}},
            413, "too_many_images", "9 images in one request; at most 8", id="too-many-base64",
        ),
        pytest.param(
            {"content": b"\0" * (256 * 1024 + 1), "headers": JSON_TYPE},
            413, "body_too_large", "request body is larger than 262144 bytes", id="body-too-large",
        ),
        pytest.param(
            {"content": lambda: iter([b"\0" * 200_000] * 2), "headers": JSON_TYPE},
            413, "body_too_large", "request body is larger than 262144 bytes",
            id="chunked-body-too-large",
        ),
        pytest.param(
            {"content": b"abc", "headers": {"content-type": "text/plain"}},
            415, "unsupported_media_type",
            "Content-Type text/plain is not accepted here; send multipart/form-data or "
            "application/json",
            id="text-plain",
        ),
        pytest.param(
            {"content": b"abc"},
            415, "unsupported_media_type",
            "Content-Type (none) is not accepted here; send multipart/form-data or "
            "application/json",
            id="no-content-type",
        ),
        pytest.param(
            {"json": {"images": ["data:image/png,abc"]}},
            400, "bad_base64", "images[0]: a data URI must be data:<type>;base64,<data>",
            id="data-uri-not-base64",
        ),
        pytest.param(
            {"json": {"images": []}},
            422, "validation_error",
            "body.images: List should have at least 1 item after validation, not 0",
            id="no-images",
        ),
        pytest.param(
            {"json": {"images": [3]}},
            422, "validation_error", "body.images.0: Input should be a valid string",
            id="not-a-string",
        ),
        pytest.param(
            {"json": ["abc"]},
            422, "validation_error",
            "body: Input should be a valid dictionary or instance of ImagesRequest",
            id="json-list",
        ),
        pytest.param(
            {"files": [("file", ("a.png", b"x", "image/png"))]},
            422, "validation_error", "no `files` parts: send each image as a part named files",
            id="no-files-parts",
        ),
        pytest.param(
            {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}},
            400, "malformed_body", "multipart body without a boundary parameter",
            id="no-boundary",
        ),
    ],
)  # fmt: skip
def test_bad_images_exact_errors(client, request_args, status, code, message):
    for route in ("/v1/embed", "/v1/classify"):
        args = {k: v() if callable(v) else v for k, v in request_args.items()}  # fresh streams
        assert answer(client.post(route, **args)) == error(status, code, message)


def test_corrupt_image_names_its_part(client, images):
    files = multipart(images[0], CORRUPT, names=["ok.png", "broken.png"])
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == "bad_image"
    assert body["error"]["message"].startswith('files[1] ("broken.png"): corrupt or truncated')


def test_bad_base64_and_malformed_json(client, images):
    response = client.post("/v1/embed", json={"images": [b64(images[0]), "not base64!"]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_base64"
    assert response.json()["error"]["message"].startswith("images[1]: not valid base64")
    for wrong_padding in (b64(images[0]) + "=", "A" + b64(images[0])):  # not strict base64
        assert client.post("/v1/embed", json={"images": [wrong_padding]}).status_code == 400
    with_newlines = b64(images[0])[:20] + "\n" + b64(images[0])[20:]
    assert client.post("/v1/embed", json={"images": [with_newlines]}).status_code == 400
    response = client.post(
        "/v1/embed", content=b'{"images": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_body"
    deep = b"[" * 100_000 + b"]" * 100_000
    json_type = {"content-type": "application/json"}
    response = client.post("/v1/distances", content=deep, headers=json_type)
    assert response.status_code == 400


def test_pillow_bomb_guard_stays_on(tiny_onnx):
    """With our pixel limit above Pillow's, Pillow's own decompression-bomb guard answers."""
    with running(tiny_onnx, max_pixels=10**12) as client:
        # Pillow's error (over twice its limit) and its warning (over its limit) both refuse.
        for side in (100_000, 10_000):
            response = client.post("/v1/embed", files=multipart(png_bomb(side, side)))
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "image_too_large"
            message = response.json()["error"]["message"]
            assert message.startswith(
                'files[0] ("image0.png"): image rejected as a decompression bomb'
            )


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ('{"embeddings": [[NaN' + ", 0" * 15 + "]]}", 422, "validation_error",
         "embeddings[0] has a value that is not finite (NaN, infinite, or beyond float32's range)"),
        ('{"embeddings": [[' + "0, " * 15 + "Infinity]]}", 422, "validation_error",
         "embeddings[0] has a value that is not finite (NaN, infinite, or beyond float32's range)"),
        ('{"embeddings": [' + "[" + "0, " * 15 + "0], " + "[" + "0, " * 15 + "1e39]]}", 422,
         "validation_error",
         "embeddings[1] has a value that is not finite (NaN, infinite, or beyond float32's range)"),
        ('{"embeddings": [[1, 2, 3]]}', 422, "validation_error",
         "embeddings[0] has 3 values; the model's embedding dim is 16"),
        ('{"embeddings": []}', 422, "validation_error",
         "body.embeddings: List should have at least 1 item after validation, not 0"),
        ('{"embeddings": [["a"]]}', 422, "validation_error",
         "body.embeddings.0.0: Input should be a valid number, unable to parse string as a number"),
        ('{"vectors": [[1]]}', 422, "validation_error", "body.embeddings: Field required"),
        ('{"embeddings": [[0]', 400, "malformed_body",
         "body is not valid JSON: Expecting ',' delimiter: line 1 column 20 (char 19)"),
        ('{"embeddings": ' + json.dumps([[0.0] * 16] * 5) + "}", 413, "too_many_vectors",
         "5 vectors in one request; at most 4"),
    ],
)  # fmt: skip
def test_bad_vectors_exact_errors(client, reference, body, status, code, message):
    assert reference.info.embedding_dim == 16  # the messages above say so
    response = client.post(
        "/v1/distances", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert answer(response) == error(status, code, message)


def test_routing_and_query_errors(client, images):
    assert answer(client.get("/nowhere")) == error(404, "not_found", "Not Found")
    response = client.get("/v1/classify")
    assert answer(response) == error(405, "method_not_allowed", "Method Not Allowed")
    assert response.headers["allow"] == "POST"
    assert answer(client.post("/v1/classify?top_k=0", files=multipart(images[0]))) == error(
        422, "validation_error", "query.top_k: Input should be greater than or equal to 1"
    )
    response = client.post("/v1/classify?topk=2", files=multipart(images[0]))  # a typo
    assert answer(response) == error(
        422,
        "validation_error",
        "unknown query parameter(s) ['topk']; allowed: return_embeddings, top_k",
    )
    response = client.post("/v1/classify?top_k=many", files=multipart(images[0]))
    assert answer(response) == error(
        422,
        "validation_error",
        "query.top_k: Input should be a valid integer, unable to parse string as an integer",
    )
    response = client.post("/v1/distances", files=multipart(images[0]))
    assert answer(response) == error(
        415,
        "unsupported_media_type",
        "Content-Type multipart/form-data is not accepted here; send application/json",
    )


# --------------------------------------------------------------------------- security


def test_api_keys(tiny_onnx, images, tmp_path, caplog):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# service keys\nfile-key-1\n\n")
    missing = error(401, "unauthorized", "missing API key: send Authorization: Bearer <key>")
    invalid = error(401, "unauthorized", "invalid API key")
    caplog.set_level(logging.DEBUG)
    with running(tiny_onnx, api_keys=[API_KEY, "other"], api_keys_file=key_file) as client:
        for route in ("/v1/model", "/v1/centers"):
            response = client.get(route)
            assert answer(response) == missing
            assert response.headers["www-authenticate"] == "Bearer"
            assert answer(client.get(route, headers={"Authorization": "Bearer wrong"})) == invalid
            assert (
                answer(client.get(route, headers={"Authorization": f"Basic {API_KEY}"})) == missing
            )
        for key in (API_KEY, "other", "file-key-1"):
            headers = {"Authorization": f"Bearer {key}"}
            assert (
                client.post("/v1/classify", files=multipart(images[0]), headers=headers).status_code
                == 200
            )
        assert answer(client.post("/v1/classify", files=multipart(images[0]))) == missing
        for route in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert client.get(route).status_code == 200
    logged = "\n".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
    assert "center_embed.access" in {record.name for record in caplog.records}
    assert API_KEY not in logged and "file-key-1" not in logged
    assert API_KEY not in repr(Settings(model=tiny_onnx, api_keys=[API_KEY]))
    key_file.write_text("# nothing yet\n")  # a key file without keys never opens the API
    with pytest.raises(UserError, match="holds no key"):
        create_app(Settings(model=tiny_onnx, api_keys_file=key_file))


def test_cors_off_unless_configured(tiny_onnx):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    with running(tiny_onnx) as client:
        response = client.options("/v1/classify", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with running(tiny_onnx, cors_origins=["http://ui.example"]) as client:
        response = client.options("/v1/classify", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.example"


# --------------------------------------------------------------------------- readiness, load


def test_readyz_before_and_after_warm_up(tiny_onnx, images):
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    gate = Gate(served, is_open=False)  # warm-up blocks until the test opens the gate
    with running(tiny_onnx, served, wait_ready=False) as client:
        assert gate.entered.wait(10)
        assert answer(client.get("/healthz")) == (200, {"status": "ok"})
        not_ready = error(503, "not_ready", "model is loading or warming up")
        assert answer(client.get("/readyz")) == not_ready
        assert answer(client.post("/v1/embed", files=multipart(images[0]))) == not_ready
        assert "center_embed_ready 0.0" in client.get("/metrics").text
        gate.opened.set()
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert answer(client.get("/readyz")) == (200, {"status": "ready"})
        assert client.post("/v1/embed", files=multipart(images[0])).status_code == 200
        assert "center_embed_ready 1.0" in client.get("/metrics").text


def test_warm_up_failure_stays_not_ready(tiny_onnx):
    good = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    wrong = ServedModel(good.model, good.centers + 1.0, good.sha256)  # not the graph's centers
    with running(tiny_onnx, wrong, wait_ready=False) as client:
        deadline = time.monotonic() + 10
        while not client.app.state.warmup_error:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = answer(client.get("/readyz"))
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert "centers initializer is not what the graph uses" in body["error"]["message"]


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


def test_queue_full_answers_429_and_timeout_504(tiny_onnx, images):
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    gate = Gate(served)
    settings = {"max_queue": 2, "max_images": 2, "max_batch": 2, "timeout_s": 5}
    with running(tiny_onnx, served, **settings) as client, ThreadPoolExecutor(2) as pool:
        gate.opened.clear()
        gate.entered.clear()
        first = pool.submit(client.post, "/v1/embed", files=multipart(images[0]))
        assert gate.entered.wait(10)  # the first request's batch is running, held
        second = pool.submit(client.post, "/v1/embed", files=multipart(images[1], images[2]))
        batcher = client.app.state.batcher
        deadline = time.monotonic() + 10
        while batcher.queued_images < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        response = client.post("/v1/embed", files=multipart(images[3]))
        assert answer(response) == error(
            429,
            "queue_full",
            "2 images are queued or being decoded; 1 more would pass the bound of 2",
        )
        assert response.headers["retry-after"] == "1"
        gate.opened.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert gate.batches[-2:] == [1, 2]

    with running(tiny_onnx, served, timeout_s=0.2) as client:
        gate.opened.clear()
        started = time.monotonic()
        response = client.post("/v1/classify", files=multipart(images[0]))
        assert answer(response) == error(
            504, "timeout", "no answer within 0.2 s (queue and inference)"
        )
        assert time.monotonic() - started < 2
        gate.opened.set()
        assert client.post("/v1/classify", files=multipart(images[0])).status_code == 200


def test_fifty_concurrent_requests_are_batched(live, reference):
    pixels = tiny_images(50, seed=3)
    files = [encode(p) for p in pixels]
    ref = reference.run(np.stack(pixels))
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def batch_counts() -> tuple[float, float]:
        text = httpx.get(f"{live.url}/metrics").text
        samples = metric_samples(text)
        singles = samples[("center_embed_batch_requests_bucket", (("le", "1.0"),))]
        return samples[("center_embed_batch_requests_count", ())], singles

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        response = await client.post(
            "/v1/classify?return_embeddings=true",
            files=[("files", (f"{i}.png", files[i], "image/png"))],
        )
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    async def all_at_once() -> list[dict]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=live.url, headers=headers, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    runs_before, singles_before = batch_counts()
    results = asyncio.run(asyncio.wait_for(all_at_once(), 60))
    runs_after, singles_after = batch_counts()
    for i, result in enumerate(results):
        assert result["label"] == int(ref["labels"][i])
        np.testing.assert_allclose(result["embedding"], ref["embeddings"][i], rtol=1e-4, atol=1e-5)
    runs = runs_after - runs_before
    assert runs < 50  # coalesced: fewer onnxruntime runs than requests
    assert runs - (singles_after - singles_before) >= 1  # some run held more than one request


# --------------------------------------------------------------------------- the batcher


def test_batcher_policy():
    """Alone: no wait. Queued during a run: one batch. Over max_batch: alone. A request
    that times out while queued never runs. close() answers what is queued."""
    calls: list[int] = []
    hold = threading.Event()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(images))
        hold.wait(5)
        return {"x": images[:, 0, 0, 0].astype(np.float32)}

    def images(n: int, value: int = 0) -> np.ndarray:
        return np.full((n, 1, 1, 3), value, np.uint8)

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch=4, max_wait_s=1.0, max_queue=9)
        batcher.start()
        hold.set()
        started = time.perf_counter()
        async with batcher.arrival(1) as arrival:
            result = await arrival.submit(images(1), timeout=5)
        assert time.perf_counter() - started < 0.5  # max_wait_s is 1 s: it was not waited
        assert result.batch_images == 1 and calls == [1]

        hold.clear()
        first = asyncio.create_task(batcher.submit(images(1, 1), 5))
        await asyncio.sleep(0.05)  # the first is running, held
        queued = [asyncio.create_task(batcher.submit(images(n, 10 + n), 5)) for n in (2, 1)]
        too_big = asyncio.create_task(batcher.submit(images(5, 5), 5))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(images(2), 5)  # 2 + 1 + 5 queued: two more pass 9
        doomed = asyncio.create_task(batcher.submit(images(1, 9), 0.05))
        with pytest.raises(BatchTimeout):
            await doomed
        hold.set()
        results = await asyncio.gather(first, *queued, too_big)
        assert calls == [1, 1, 3, 5]  # [2, 1] together; the 5 alone; the timed-out never
        np.testing.assert_array_equal(results[1].outputs["x"], [12, 12])
        np.testing.assert_array_equal(results[2].outputs["x"], [11])
        assert results[1].batch_images == 3

        hold.clear()
        running_task = asyncio.create_task(batcher.submit(images(1, 1), 5))
        await asyncio.sleep(0.05)
        last = asyncio.create_task(batcher.submit(images(2, 7), 5))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)
        hold.set()
        await closing
        assert (await running_task).batch_images == 1
        np.testing.assert_array_equal((await last).outputs["x"], [7, 7])

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_batch_waits_for_requests_on_the_way():
    """A request announced (still decoding) is waited for, up to max_wait_s."""
    calls: list[int] = []

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(images))
        return {"x": np.zeros(len(images), np.float32)}

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.5, max_queue=8)
        batcher.start()
        one = np.zeros((1, 1, 1, 3), np.uint8)

        async def late(delay: float) -> None:
            async with batcher.arrival(1) as arrival:
                await asyncio.sleep(delay)  # "decoding"
                await arrival.submit(one, 5)

        await asyncio.gather(late(0), late(0.05))
        with pytest.raises(QueueFull):  # admission counts the images being decoded too
            async with batcher.arrival(5), batcher.arrival(4):
                pass
        assert (batcher._queued, batcher._reserved, batcher._arriving) == (0, 0, 0)
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert calls == [2]


# --------------------------------------------------------------------------- shutdown


def test_graceful_shutdown_finishes_in_flight_requests(tiny_onnx, images):
    served = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    gate = Gate(served)
    app = create_app(Settings(model=tiny_onnx), model=served)
    with serve_in_thread(app) as server, ThreadPoolExecutor(3) as pool:
        gate.opened.clear()
        gate.entered.clear()
        url = f"{server.url}/v1/classify"
        pending = [pool.submit(httpx.post, url, files=multipart(images[0]), timeout=30)]
        assert gate.entered.wait(10)
        pending += [
            pool.submit(httpx.post, url, files=multipart(x), timeout=30) for x in images[1:3]
        ]
        deadline = time.monotonic() + 10
        while app.state.batcher.queued_images < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        server.server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        assert not any(f.done() for f in pending)  # still held, not dropped
        gate.opened.set()
        assert [f.result().status_code for f in pending] == [200, 200, 200]


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_serve_workers_and_sigterm(tiny_onnx, images, workers):
    port = free_port()
    command = [sys.executable, "-m", "center_embed.cli", "serve", str(tiny_onnx),
               "--port", str(port), "--workers", str(workers)]  # fmt: skip
    env = {**os.environ, "CENTER_EMBED_API_KEYS": API_KEY}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"

    def logged() -> list[dict]:
        return [json.loads(line) for line in list(lines) if line.startswith("{")]

    try:
        deadline = time.monotonic() + 60
        while sum(line["message"] == "ready" for line in logged()) < workers:  # all ready
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(4):  # new connections: either worker may answer
            response = httpx.post(f"{url}/v1/embed", files=multipart(images[0]), headers=headers)
            assert response.status_code == 200
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
        labels = (("method", "POST"), ("route", "/v1/embed"), ("status", "200"))
        assert samples[("center_embed_requests_total", labels)] == 4  # summed over workers
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    reader.join(10)
    access = [line for line in logged() if line["logger"] == "center_embed.access"]
    assert {"method", "path", "status", "duration_ms", "queue_ms", "inference_ms"} <= set(
        next(line for line in access if line["path"] == "/v1/embed")
    )
    assert sum(line["message"] == "stopped" for line in logged()) == workers
    assert API_KEY not in "".join(lines)


def test_cli_errors_and_help(tmp_path, capsys, monkeypatch):
    from center_embed.cli import main

    monkeypatch.setenv("CENTER_EMBED_MODEL", "")  # serve sets it; restored afterwards

    assert main(["serve", str(tmp_path / "absent.onnx")]) == 1
    assert "error: model not found" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    assert main(["serve", str(tmp_path / "junk.onnx")]) == 1
    assert "is not a readable ONNX model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "MAX_BATCH" in capsys.readouterr().out


def test_bad_settings_never_echo_keys(tiny_onnx, monkeypatch, capsys):
    from center_embed.cli import main

    monkeypatch.setenv("CENTER_EMBED_MODEL", "")  # serve sets it; restored afterwards
    monkeypatch.setenv("CENTER_EMBED_API_KEYS", "very-secret")
    monkeypatch.setenv("CENTER_EMBED_MAX_BATCH", "0")
    assert main(["serve", str(tiny_onnx)]) == 1
    err = capsys.readouterr().err
    assert "CENTER_EMBED_MAX_BATCH" in err and "very-secret" not in err


# --------------------------------------------------------------------------- contracts


def test_openapi_matches_committed_copy(client):
    served = client.get("/openapi.json").json()
    if os.environ.get("CENTER_EMBED_UPDATE_OPENAPI"):
        OPENAPI_COPY.write_text(json.dumps(served, indent=2, sort_keys=True) + "\n")
    assert served == json.loads(OPENAPI_COPY.read_text()), (
        "the API changed: review it, then CENTER_EMBED_UPDATE_OPENAPI=1 pytest "
        "tests/service/test_service.py -k openapi"
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


def test_client_maps_every_error_code():
    from center_embed.service.client import (
        EXCEPTION_BY_STATUS,
        Client,
        Overloaded,
        ServiceError,
    )
    from center_embed.service.error_codes import ErrorCode

    assert set(EXCEPTION_BY_STATUS) | {404, 405, 500} == {code.status for code in ErrorCode}
    for code in ErrorCode:
        body = {"error": {"code": code.value, "message": "why"}}
        with pytest.raises(ServiceError) as raised:
            Client._answer(httpx.Response(code.status, json=body))
        assert type(raised.value) is EXCEPTION_BY_STATUS.get(code.status, ServiceError)
        assert raised.value.code is code and raised.value.code == code.value
        assert (raised.value.status, raised.value.message) == (code.status, "why")
        assert str(raised.value) == f"{code.status} {code.value}: why"
    with pytest.raises(Overloaded) as raised:  # not the service's JSON: a proxy's page
        Client._answer(httpx.Response(429, text="<html>slow down</html>"))
    assert (raised.value.code, raised.value.message) == ("http_error", "<html>slow down</html>")


def test_client_imports_no_web_framework():
    code = (
        "import sys, center_embed.service.client; "
        "print([m for m in ('fastapi', 'starlette', 'pydantic', 'torch') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the client


def test_python_client(live, reference, images, tmp_path):
    from center_embed.service.client import (
        BadRequest,
        Classification,
        Client,
        ConnectionFailed,
        Unauthorized,
        ValidationFailed,
    )

    pixels = tiny_images(3, seed=5)
    path = tmp_path / "cat.png"
    path.write_bytes(encode(pixels[0]))
    ref = reference.run(np.stack(pixels))
    with Client(live.url, api_key=API_KEY) as client:
        inputs = [path, encode(pixels[1]), Image.fromarray(pixels[2])]
        np.testing.assert_allclose(client.embed(inputs), ref["embeddings"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            client.embed(np.stack(pixels)), ref["embeddings"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            client.embed(str(path))[0], ref["embeddings"][0], rtol=1e-5, atol=1e-6
        )
        results = client.classify(pixels[0], top_k=2, return_embeddings=True)
        assert isinstance(results[0], Classification) and len(results[0].distances) == 2
        assert results[0].label == int(ref["labels"][0])
        assert results[0].embedding.shape == (reference.info.embedding_dim,)
        assert results[0].atypicality == pytest.approx(float(ref["atypicality"][0]), abs=1e-4)
        via_vectors = client.distances(ref["embeddings"])
        assert [r.label for r in via_vectors] == ref["labels"].tolist()
        assert all(r.atypicality is None for r in via_vectors)  # a vector has no image
        names, centers = client.centers()
        assert names == reference.info.class_names and centers.shape[0] == len(names)
        assert client.model()["provider"] == "CPUExecutionProvider"
        assert client.ready()

        with pytest.raises(BadRequest) as bad:
            client.classify([encode(pixels[0]), CORRUPT])
        assert bad.value.status == 400 and bad.value.code == "bad_image"
        assert bad.value.message.startswith('files[1] ("image[1]"): corrupt or truncated')
        with pytest.raises(ValidationFailed, match="embedding dim is 16"):
            client.distances([1.0, 2.0])
        with pytest.raises(ValueError, match="image\\[0\\]: pixel values must lie in"):
            client.embed(np.full((4, 4, 3), 300.0, np.float32))
    with Client(live.url) as anonymous, pytest.raises(Unauthorized, match="missing API key"):
        anonymous.embed(path)
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as nowhere:
        assert not nowhere.ready()
        with pytest.raises(ConnectionFailed):
            nowhere.model()
