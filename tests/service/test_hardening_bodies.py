"""Hostile bodies and files on a real server (uvicorn on 127.0.0.1, in this process): a JSON
body costs in proportion to what may be accepted (time, memory, the event loop free), vectors
are strict numbers, a bad centers file is one line at start and a 503 (never a 500, never a
path of the server) at run time, and class names are one form, printable, valid UTF-8."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import encode, serve_in_thread, tiny_images

ADMIN = "admin-key-0123456789"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
JSON_TYPE = {"content-type": "application/json"}
MiB = 1024 * 1024


# --------------------------------------------------------------------------- measuring


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith(field + ":"))
    return int(line.split()[1])


@dataclasses.dataclass
class Cost:
    seconds: float
    peak_growth_mib: float  # the process's peak RSS during the request, above its RSS before
    worst_healthz_s: float  # the slowest /healthz answered meanwhile
    response: httpx.Response


def cost_of(url: str, path: str, body: bytes) -> Cost:
    """POST `body` to `path` while another client polls /healthz; the time, the peak memory
    growth of this process (the server's) and the slowest /healthz meanwhile."""
    worst, started, stop = [0.0], threading.Event(), threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                t = time.perf_counter()
                client.get(f"{url}/healthz")
                worst[0] = max(worst[0], time.perf_counter() - t)
                started.set()
                stop.wait(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    assert started.wait(10), "the poller never got a /healthz answer"
    before = status_kib("VmRSS")
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux)
    t = time.perf_counter()
    response = httpx.post(f"{url}{path}", content=body, headers=JSON_TYPE, timeout=120)
    seconds = time.perf_counter() - t
    peak = status_kib("VmHWM")
    stop.set()
    poller.join(60)
    return Cost(seconds, (peak - before) / 1024, worst[0], response)


@pytest.fixture(scope="module")
def server(tiny_onnx: Path):
    """The real app with room for 8192 vectors (a /v1/distances body of up to 9 MB)."""
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    app = create_app(Settings(model=tiny_onnx, max_wait_ms=5, max_vectors=8192))
    with serve_in_thread(app) as live:
        yield live


# --------------------------------------------------------------------------- JSON bodies


def test_four_million_empty_arrays_are_refused_fast(server):
    body = b'{"images": [' + b",".join([b"[]"] * 4_000_000) + b"]}"  # 12 MB
    cost = cost_of(server.url, "/v1/embed", body)
    assert cost.response.status_code in (413, 422), cost.response.text
    assert cost.response.json()["error"]["code"] in ("too_many_images", "validation_error")
    assert cost.seconds < 2.0, cost
    assert cost.peak_growth_mib < 200, cost
    assert cost.worst_healthz_s < 0.5, cost


def test_a_million_bad_vectors_are_refused_fast(server):
    body = b'{"embeddings": [' + b",".join([b'["a"]'] * 1_000_000) + b"]}"  # 6 MB
    cost = cost_of(server.url, "/v1/distances", body)
    assert cost.response.status_code in (413, 422), cost.response.text
    assert cost.seconds < 2.0, cost
    assert cost.peak_growth_mib < 200, cost
    assert cost.worst_healthz_s < 0.5, cost


def test_many_bad_values_name_five_and_count_the_rest(server):
    body = {"embeddings": [["x"] * 16] * 3}
    response = httpx.post(f"{server.url}/v1/distances", json=body)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.count("body.embeddings.") == 5 and message.endswith("and 43 more")


@pytest.mark.parametrize(
    "value, words",
    [("1.5", "not a string"), (True, "not a boolean"), (False, "not a boolean"),
     (None, "valid number"), ([1.0], "valid number"), ({"x": 1}, "valid number")],
)  # fmt: skip
def test_vectors_hold_numbers_only(server, value, words):
    vector = [0.0] * 15 + [value]
    response = httpx.post(f"{server.url}/v1/distances", json={"embeddings": [vector]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"].startswith("body.embeddings.0.15: ") and words in error["message"]
    ints = httpx.post(f"{server.url}/v1/distances", json={"embeddings": [[0] * 15 + [1]]})
    assert ints.status_code == 200, ints.text  # JSON integers are numbers


def test_v2_json_is_parsed_off_the_event_loop(server):
    body = b'{"inputs": [' + b",".join([b"null"] * 1_000_000) + b"]}"  # 5 MB
    cost = cost_of(server.url, "/v2/models/center_embed/infer", body)
    assert cost.response.status_code == 400, cost.response.text
    assert cost.worst_healthz_s < 0.5, cost
    assert cost.seconds < 2.0 and cost.peak_growth_mib < 200, cost


def test_v2_long_lists_are_refused_before_their_elements():
    """Past the byte-count bound (a model of large images allows many values), a list longer
    than any accepted one is refused before pydantic makes an error for each element."""
    from center_embed.service.errors import ApiError
    from center_embed.service.inference_protocol import parse_request

    for body in (
        {"inputs": [None] * 200_000},
        {"inputs": [{"name": "images", "shape": [1] * 100_000, "datatype": "UINT8"}]},
        {"inputs": [{"name": "images"}], "outputs": [None] * 100_000},
    ):
        t = time.perf_counter()
        with pytest.raises(ApiError) as raised:
            parse_request(json.dumps(body).encode(), None, (224, 224), 64)
        assert raised.value.status == 400
        assert time.perf_counter() - t < 0.5, raised.value.message


# --------------------------------------------------------------------------- the centers file


@pytest.fixture
def model_copy(tiny_onnx: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copyfile(tiny_onnx, path)
    return path


def base_set(model: Path):
    from center_embed.contract import read_centers
    from center_embed.enrolment import CenterSet
    from center_embed.fileio import sha256_file
    from center_embed.runtime import OnnxModel, RuntimeOptions

    info = OnnxModel(model, RuntimeOptions(device="cpu")).info
    return CenterSet.from_model(info, read_centers(model), sha256_file(model))


def bad_files(model: Path) -> dict[str, bytes]:
    """Centers files for `model` that are valid .npz but not valid centers files."""
    from center_embed.enrolment import encode_center_set

    base = base_set(model)
    nan_centers = base.centers.copy()
    nan_centers[1, 3] = np.nan
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps([1, 2, 3])), centers=base.centers)
    return {
        "list meta": buffer.getvalue(),
        "NaN centers": encode_center_set(dataclasses.replace(base, centers=nan_centers)),
        "NaN threshold": encode_center_set(
            dataclasses.replace(base, thresholds={**base.thresholds, base.names[0]: math.nan})
        ),
    }


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: the server sees the change at its next request


@pytest.mark.parametrize("kind", ["list meta", "NaN centers", "NaN threshold"])
def test_bad_centers_file_at_start_is_one_line(model_copy, kind, monkeypatch, capsys):
    import warnings

    from center_embed.cli import main
    from center_embed.enrolment import centers_file_for
    from center_embed.errors import UserError
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    centers = centers_file_for(model_copy)
    centers.write_bytes(bad_files(model_copy)[kind])
    with warnings.catch_warnings():  # starlette's notice that its TestClient will move
        warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient
    with pytest.raises(UserError) as raised, TestClient(create_app(Settings(model=model_copy))):
        pass
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{centers.name} is not a readable")
    assert str(model_copy.parent) not in message

    def serve(*args, **kwargs):
        raise AssertionError("the server started despite a bad centers file")

    monkeypatch.setenv("CENTER_EMBED_MODEL", "")  # serve sets it; restored afterwards
    monkeypatch.setattr("uvicorn.run", serve)
    assert main(["serve", str(model_copy), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@contextlib.contextmanager
def real_server(model: Path) -> Iterator[str]:
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    app = create_app(Settings(model=model, admin_keys=[ADMIN], max_wait_ms=1))
    with serve_in_thread(app) as live:
        yield live.url


def test_bad_centers_file_at_run_time_is_a_503_until_fixed(model_copy):
    """The documented behaviour (ServedModel.current_centers): the routes that need the
    centers answer 503 centers_unavailable, naming the file by its name alone, until a valid
    file replaces the bad one; never a 500."""
    from center_embed.enrolment import centers_file_for, encode_center_set

    centers = centers_file_for(model_copy)
    picture = encode(tiny_images(1)[0])
    good = encode_center_set(base_set(model_copy))
    with real_server(model_copy) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/centers").status_code == 200
        for kind, data in bad_files(model_copy).items():
            replace_file(centers, data)
            answers = {
                "classify": client.post("/v1/classify", files={"files": ("a.png", picture)}),
                "centers": client.get("/v1/centers"),
                "model": client.get("/v1/model"),
                "distances": client.post("/v1/distances", json={"embeddings": [[0.0] * 16]}),
                "put": client.put(
                    "/v1/centers/zebra", files={"files": ("a.png", picture)}, headers=ADMIN_AUTH
                ),
            }
            for route, response in answers.items():
                assert response.status_code == 503, (kind, route, response.text)
                error = response.json()["error"]
                assert error["code"] == "centers_unavailable", (kind, route)
                assert error["message"].startswith(centers.name), (kind, route, error)
                assert str(model_copy.parent) not in response.text, (kind, route)
            assert client.get("/healthz").status_code == 200
            replace_file(centers, good)
            assert client.get("/v1/centers").status_code == 200, kind
        response = client.post("/v1/classify", files={"files": ("a.png", picture)})
        assert response.status_code == 200 and response.json()["model"]["num_classes"] == 3


# --------------------------------------------------------------------------- class names


def test_class_names_are_one_form_and_printable_utf8(model_copy):
    pictures = [encode(p) for p in tiny_images(2, seed=5)]

    def put(client: httpx.Client, raw_name: str) -> httpx.Response:
        files = [("files", (f"z{i}.png", data, "image/png")) for i, data in enumerate(pictures)]
        return client.put(f"/v1/centers/{raw_name}", files=files, headers=ADMIN_AUTH)

    with real_server(model_copy) as url, httpx.Client(base_url=url, timeout=30) as client:
        nfc = put(client, "caf%C3%A9")  # "café", é composed
        nfd = put(client, "cafe%CC%81")  # "café", e + combining acute
        assert nfc.status_code == nfd.status_code == 200, (nfc.text, nfd.text)
        assert nfc.json()["class_name"] == nfd.json()["class_name"] == "caf\u00e9"
        assert nfd.json()["label"] == nfc.json()["label"] == 3
        assert nfd.json()["num_classes"] == 4
        padded = put(client, "%20%20cat%20%20")
        plain = put(client, "cat")
        assert padded.json()["class_name"] == plain.json()["class_name"] == "cat"
        assert plain.json()["num_classes"] == 5 and plain.json()["label"] == 4
        removed = client.delete("/v1/centers/%20cat", headers=ADMIN_AUTH)
        assert removed.status_code == 200 and removed.json()["num_classes"] == 4
        for raw in ("%FF", "a%FFb", "%ED%A0%80", "x%ED%B2%A9y"):  # not UTF-8; lone surrogates
            for response in (
                put(client, raw),
                client.delete(f"/v1/centers/{raw}", headers=ADMIN_AUTH),
            ):
                assert response.status_code == 400, (raw, response.text)
                assert response.json()["error"]["code"] == "bad_request"
                assert "not valid UTF-8" in response.json()["error"]["message"]
        for raw in ("a%E2%80%A8b", "a%E2%80%A9b", "a%C2%A0b", "%E2%80%8B"):
            response = put(client, raw)
            assert response.status_code == 422, (raw, response.text)
            assert response.json()["error"]["code"] == "bad_class_name"
        names = [c["class_name"] for c in client.get("/v1/centers").json()["centers"]]
        assert len(names) == 4 and names[3] == "caf\u00e9"
