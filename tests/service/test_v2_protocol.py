"""The Open Inference Protocol (/v2) through Triton's own client, tritonclient[http], against
the real app under uvicorn on 127.0.0.1; every answer is compared with onnxruntime run
directly on the same pixels, every bad request with its exact status and `{"error": ...}`.
"""

from __future__ import annotations

import json
import time
import warnings

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from center_embed.contract import ALL_OUTPUT_NAMES, OUTPUT_NAMES, PROTOCOL_MODEL_NAME
from center_embed.runtime import RuntimeOptions
from center_embed.service.app import create_app
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings
from tests.helpers import API_KEY, serve_in_thread, tiny_images

with warnings.catch_warnings():  # starlette's notice that its TestClient will move to httpx2
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


def auth() -> dict[str, str]:
    """A fresh headers dict each time: tritonclient's infer adds its own headers to the one
    it is given."""
    return {"Authorization": f"Bearer {API_KEY}"}


MAX_IMAGES = 8
NAME = PROTOCOL_MODEL_NAME
INFER = f"/v2/models/{NAME}/infer"


@pytest.fixture(scope="module")
def live(tiny_onnx):
    """The app under uvicorn, API key required, small limits so that they can be hit."""
    settings = Settings(
        model=tiny_onnx, api_keys=[API_KEY], max_wait_ms=5, max_images=MAX_IMAGES,
        max_body_bytes=256 * 1024,
    )  # fmt: skip
    with serve_in_thread(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    url = live.url.removeprefix("http://")
    c = triton.InferenceServerClient(url, connection_timeout=10, network_timeout=20)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.stack(tiny_images(5))  # (5, 32, 32, 3) uint8


def images_input(pixels: np.ndarray, binary: bool, datatype: str = "UINT8") -> triton.InferInput:
    given = triton.InferInput("images", list(pixels.shape), datatype)
    given.set_data_from_numpy(pixels, binary_data=binary)
    return given


def check_outputs(result, expected: dict[str, np.ndarray], names) -> None:
    for name in names:
        got = result.as_numpy(name)
        assert got is not None, name
        assert got.dtype == expected[name].dtype and got.shape == expected[name].shape, name
        if name == "labels":
            np.testing.assert_array_equal(got, expected[name])
        else:
            np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def triton_error(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


# --------------------------------------------------------------------------- health, metadata


def test_health_and_metadata(client, reference):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
    assert not client.is_model_ready("other") and not client.is_model_ready(NAME, "2")
    server = client.get_server_metadata()
    assert server["name"] == "center-embed" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(NAME)
    h, w = reference.info.input_size
    d, c = reference.info.embedding_dim, reference.info.num_classes
    assert meta == {
        "name": NAME,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, h, w, 3]}],
        "outputs": [
            {"name": "embeddings", "datatype": "FP32", "shape": [-1, d]},
            {"name": "distances", "datatype": "FP32", "shape": [-1, c]},
            {"name": "labels", "datatype": "INT64", "shape": [-1]},
            {"name": "min_distances", "datatype": "FP32", "shape": [-1]},
            {"name": "unknown_scores", "datatype": "FP32", "shape": [-1]},
            {"name": "atypicality", "datatype": "FP32", "shape": [-1]},
        ],
    }
    # The metadata's datatypes are those onnxruntime declares for the file.
    declared = {o.name: o.type for o in reference.backend.session.get_outputs()}
    assert declared == {
        "embeddings": "tensor(float)",
        "distances": "tensor(float)",
        "labels": "tensor(int64)",
        "min_distances": "tensor(float)",
        "unknown_scores": "tensor(float)",
        "atypicality": "tensor(float)",
    }
    assert client.get_model_metadata(NAME, "1") == meta
    status, message = triton_error(lambda: client.get_model_metadata("other"))
    assert status == "404" and "unknown model 'other'" in message


# --------------------------------------------------------------------------- inference


def test_infer_json_tensors_equal_onnxruntime(client, reference, pixels):
    outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in OUTPUT_NAMES]
    result = client.infer(
        NAME, [images_input(pixels, binary=False)], outputs=outputs, request_id="r-7",
        headers=auth(),
    )  # fmt: skip
    response = result.get_response()
    assert response["id"] == "r-7" and response["model_name"] == NAME
    assert response["model_version"] == "1"
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    check_outputs(result, reference.run(pixels), OUTPUT_NAMES)


def test_infer_binary_tensors_equal_onnxruntime(client, reference, pixels):
    result = client.infer(NAME, [images_input(pixels, binary=True)], headers=auth())  # all, binary
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == list(ALL_OUTPUT_NAMES)  # the file's five
    assert all(o["parameters"]["binary_data_size"] > 0 and "data" not in o for o in outputs)
    check_outputs(result, reference.run(pixels), ALL_OUTPUT_NAMES)


def test_infer_a_subset_mixed_binary_and_json(client, reference, pixels):
    outputs = [
        triton.InferRequestedOutput("min_distances", binary_data=False),
        triton.InferRequestedOutput("labels", binary_data=True),
    ]
    result = client.infer(
        NAME, [images_input(pixels[:2], binary=True)], outputs=outputs, model_version="1",
        headers=auth(),
    )  # fmt: skip
    described = result.get_response()["outputs"]
    assert [o["name"] for o in described] == ["min_distances", "labels"]
    assert "data" in described[0] and described[1]["parameters"] == {"binary_data_size": 16}
    check_outputs(result, reference.run(pixels[:2]), ["min_distances", "labels"])
    assert result.as_numpy("embeddings") is None


def test_infer_refusals_through_the_client(client, pixels):
    def infer(inputs, model=NAME, outputs=None, key=True):
        headers = auth() if key else None
        return lambda: client.infer(model, inputs, outputs=outputs, headers=headers)

    small = np.zeros((1, 16, 16, 3), np.uint8)
    status, message = triton_error(infer([images_input(small, binary=True)]))
    assert status == "400" and "shape [1, 16, 16, 3]" in message and "[N, 32, 32, 3]" in message
    floats = pixels.astype(np.float32)
    status, message = triton_error(infer([images_input(floats, binary=True, datatype="FP32")]))
    assert status == "400" and "datatype 'FP32'" in message and "UINT8" in message
    status, message = triton_error(infer([images_input(pixels, binary=True)], model="resnet"))
    assert (status, message) == ("404", "unknown model 'resnet'; this server serves 'center_embed'")
    unknown = [triton.InferRequestedOutput("logits")]
    status, message = triton_error(infer([images_input(pixels, binary=True)], outputs=unknown))
    assert status == "400" and "unknown output(s) ['logits']" in message
    status, message = triton_error(infer([images_input(pixels, binary=True)], key=False))
    assert (status, message) == ("401", "missing API key: send Authorization: Bearer <key>")
    many = np.zeros((MAX_IMAGES + 1, 32, 32, 3), np.uint8)
    status, message = triton_error(infer([images_input(many, binary=True)]))
    assert (status, message) == ("413", f"{MAX_IMAGES + 1} images in one request; at most 8")


# --------------------------------------------------------------------------- the wire, raw


def binary_request(pixels: np.ndarray, size: int | None = None, extra: bytes = b""):
    header = json.dumps({"inputs": [{
        "name": "images", "shape": list(pixels.shape), "datatype": "UINT8",
        "parameters": {"binary_data_size": pixels.nbytes if size is None else size},
    }]}).encode()  # fmt: skip
    headers = {**auth(), "Inference-Header-Content-Length": str(len(header))}
    return header + pixels.tobytes() + extra, headers


def json_request(**changes) -> tuple[bytes, dict[str, str]]:
    """One 32x32 image as a JSON tensor, with `changes` to the request object."""
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    images = {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8"}
    request = {"inputs": [{**images, "data": pixels.ravel().tolist()}], **changes}
    return json.dumps(request).encode(), auth()


def bad_request(case: str) -> tuple[bytes, dict[str, str]]:
    one = np.zeros((1, 32, 32, 3), np.uint8)
    images = {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8"}
    flat = one.ravel().tolist()
    if case == "size_mismatch":
        return binary_request(one, size=one.nbytes - 1)
    if case == "trailing_bytes":
        return binary_request(one, extra=b"\0")
    if case == "header_length":
        body, headers = binary_request(one)
        return body, {**headers, "Inference-Header-Content-Length": "999999"}
    if case == "gzip":
        body, headers = binary_request(one)
        return body, {**headers, "Content-Encoding": "gzip"}
    if case == "too_large":
        return binary_request(np.zeros((MAX_IMAGES, 32, 32, 3), np.uint8), extra=b"x" * 300_000)
    if case == "not_json":
        return b"{not json", auth()
    changes = {
        "no_inputs": {"inputs": []},
        "two_inputs": {"inputs": [{**images, "data": flat}, {**images, "name": "extra"}]},
        "bad_values": {"inputs": [{**images, "data": [256] + flat[1:]}]},
        "ragged": {"inputs": [{**images, "data": [flat[:10], flat[10:]]}]},
        "floats": {"inputs": [{**images, "data": [float(v) for v in flat]}]},
        "shared_memory": {"inputs": [{**images, "parameters": {"shared_memory_region": "r"}}]},
        "duplicate_output": {"outputs": [{"name": "labels"}, {"name": "labels"}]},
        "binary_flag": {"parameters": {"binary_data_output": "yes"}},
    }
    return json_request(**changes[case])


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("size_mismatch", 400, "size 3071; shape [1, 32, 32, 3] of UINT8 is 3072 bytes"),
        ("trailing_bytes", 400, "3073 bytes follow the JSON header; the binary inputs declare"),
        ("header_length", 400, "Inference-Header-Content-Length is '999999'"),
        ("not_json", 400, "the request's JSON is not valid"),
        ("no_inputs", 400, "not an inference request: inputs: List should have at least 1 item"),
        ("two_inputs", 400, "inputs ['images', 'extra']: the model takes exactly one input"),
        ("bad_values", 400, "UINT8 values must lie in 0-255"),
        ("ragged", 400, "data must be 3072 integers"),
        ("floats", 400, "data must be 3072 integers"),
        ("shared_memory", 400, "shared memory is not supported"),
        ("duplicate_output", 400, "name an output more than once"),
        ("binary_flag", 400, "parameter binary_data_output must be true or false, not 'yes'"),
        ("gzip", 415, "Content-Encoding gzip is not supported"),
        ("too_large", 413, "request body is larger than 262144 bytes"),
    ],
)  # fmt: skip
def test_bad_requests_exact_errors(live, case, status, message):
    body, headers = bad_request(case)
    response = httpx.post(live.url + INFER, content=body, headers=headers, timeout=20)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and isinstance(response.json()["error"], str)
    assert message in response.json()["error"]


def test_json_tensors_nested_and_flat_agree(live, reference, pixels):
    images = {"name": "images", "shape": [2, 32, 32, 3], "datatype": "UINT8"}
    nested = {"inputs": [{**images, "data": pixels[:2].tolist()}], "outputs": [{"name": "labels"}]}
    response = httpx.post(live.url + INFER, json=nested, headers=auth(), timeout=20)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (labels,) = response.json()["outputs"]
    assert labels == {
        "name": "labels", "datatype": "INT64", "shape": [2],
        "data": reference.run(pixels[:2])["labels"].tolist(),
    }  # fmt: skip
    assert float(response.headers["x-inference-time"]) > 0  # the /v1 timing headers too


def test_unknown_routes_metrics_and_open_health(live, pixels):
    base = live.url
    response = httpx.get(f"{base}/v2/repository/index")
    assert response.status_code == 404
    assert response.json() == {"error": "no route /v2/repository/index in this server"}
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{NAME}/ready",
                 f"/v2/models/{NAME}"):  # fmt: skip
        assert httpx.get(base + path).status_code == 200, path  # open, like /healthz
    body, headers = binary_request(pixels[:3])
    assert httpx.post(base + INFER, content=body, headers=headers).status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    route = "/v2/models/{name}/infer"
    assert f'center_embed_images_total{{route="{route}"}}' in metrics
    assert f'center_embed_requests_total{{method="POST",route="{route}",status="200"}}' in metrics


def test_not_ready_answers(tiny_onnx):
    """Health answers 400 while not ready (the spec's "4xx is false"); infer 503 {"error"}."""
    good = ServedModel.open(tiny_onnx, RuntimeOptions("cpu"))
    wrong = ServedModel(good.model, good.centers + 1.0, good.sha256)  # fails its warm-up
    with TestClient(create_app(Settings(model=tiny_onnx), model=wrong)) as client:
        deadline = time.monotonic() + 10
        while not client.app.state.warmup_error:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get(f"/v2/models/{NAME}/ready").status_code == 400
        body, headers = binary_request(np.zeros((1, 32, 32, 3), np.uint8))
        response = client.post(INFER, content=body, headers=headers)
        assert response.status_code == 503
        assert response.json()["error"].startswith("model failed to warm up")
