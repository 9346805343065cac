"""Enrolment over HTTP: PUT/DELETE /v1/centers/{name} on the real app, persisted in the
centers file beside the model, seen by every app on that file, never tearing an answer, and
every bad input a 4xx that changes nothing."""

from __future__ import annotations

import base64
import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import API_KEY, encode, serve_in_thread, tiny_images

ADMIN = "admin-key-0123456789"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def model_copy(tiny_onnx: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model: enrolment writes its centers file beside it."""
    path = tmp_path / "model.onnx"
    shutil.copyfile(tiny_onnx, path)
    return path


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    return [encode(p) for p in tiny_images(8, seed=5)]


@contextlib.contextmanager
def running(model: Path, **settings) -> Iterator[TestClient]:
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    settings = {"admin_keys": [ADMIN], "max_wait_ms": 1, **settings}
    with TestClient(create_app(Settings(model=model, **settings))) as client:
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.01)
        yield client


def files(*images: bytes) -> list[tuple]:
    return [("files", (f"z{i}.png", data, "image/png")) for i, data in enumerate(images)]


def embeddings_of(model: Path, images: list[bytes]) -> np.ndarray:
    from center_embed.runtime import OnnxModel, RuntimeOptions

    reference = OnnxModel(model, RuntimeOptions(device="cpu"))
    return reference.run(np.stack([reference.decode(d) for d in images]))["embeddings"]


def test_enrolled_class_is_answered_and_persists_across_a_restart(model_copy, pictures):
    enrolment = pictures[:6]
    with running(model_copy) as client:
        before = client.get("/v1/centers").json()
        assert before["version"] == 0 and len(before["centers"]) == 3
        put = client.put("/v1/centers/zebra", files=files(*enrolment), headers=ADMIN_AUTH)
        assert put.status_code == 200, put.text
        assert put.json() | {"unknown_threshold": None} == {
            "class_name": "zebra", "action": "enrol", "images": 6, "label": 3,
            "unknown_threshold": None, "num_classes": 4, "version": 1,
        }  # fmt: skip
        after = client.get("/v1/centers").json()
        result = client.post("/v1/classify", files=files(pictures[7])).json()
        metrics = client.get("/metrics").text
    e = embeddings_of(model_copy, enrolment).astype(np.float64)
    brute_center = [sum(row[j] for row in e) / len(e) for j in range(e.shape[1])]
    assert after["version"] == 1 and after["centers"][3]["class_name"] == "zebra"
    assert after["centers"][3]["images"] == 6 and after["centers"][0]["images"] is None
    np.testing.assert_allclose(after["centers"][3]["center"], brute_center, rtol=1e-4, atol=1e-5)
    query = embeddings_of(model_copy, [pictures[7]])[0].astype(np.float64)
    # A distance is a squared distance; the score (export's default) the min of it less ‖e‖²,
    # plus the image's atypicality.
    brute = sum((query[j] - brute_center[j]) ** 2 for j in range(len(query)))
    answer = result["results"][0]
    assert answer["distances"]["zebra"] == pytest.approx(brute, rel=1e-3, abs=1e-3)
    if answer["class_name"] == "zebra":
        score = brute - sum(q**2 for q in query) + answer["atypicality"]
        assert answer["unknown_score"] == pytest.approx(score, rel=1e-3, abs=1e-3)
    assert result["model"]["num_classes"] == 4 and result["model"]["centers_version"] == 1
    assert 'center_embed_enrolments_total{action="enrol"} 1.0' in metrics
    assert "center_embed_centers_version 1.0" in metrics

    assert (model_copy.parent / "model.onnx.centers.npz").is_file()
    with running(model_copy) as client:  # a new process's app on the same files
        again = client.get("/v1/centers").json()
    assert again == after


def test_two_apps_on_one_file_see_each_others_changes(model_copy, pictures):
    """--workers N: every worker checks the file (one os.stat) when a request starts."""
    with running(model_copy) as first, running(model_copy) as second:
        trained = [c["class_name"] for c in first.get("/v1/centers").json()["centers"]]
        assert first.put("/v1/centers/zebra", files=files(*pictures[:3]),
                         headers=ADMIN_AUTH).status_code == 200  # fmt: skip
        seen = second.get("/v1/centers").json()
        assert [c["class_name"] for c in seen["centers"]][-1] == "zebra" and seen["version"] == 1
        assert "zebra" in second.post("/v1/classify", files=files(pictures[0])).json()[
            "results"][0]["distances"]  # fmt: skip
        # a change made by the second is the base of the first's next change: nothing lost
        assert second.put("/v1/centers/okapi", files=files(*pictures[3:6]),
                          headers=ADMIN_AUTH).json()["version"] == 2  # fmt: skip
        gone = first.delete("/v1/centers/zebra", headers=ADMIN_AUTH).json()
        assert gone["version"] == 3 and gone["num_classes"] == 4
        names = [c["class_name"] for c in second.get("/v1/centers").json()["centers"]]
        assert names == [*trained, "okapi"]


def test_another_models_centers_file_is_refused(model_copy, pictures, tmp_path):
    import onnx

    from center_embed.errors import UserError
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    with running(model_copy) as client:
        client.put("/v1/centers/zebra", files=files(*pictures[:3]), headers=ADMIN_AUTH)
    centers_file = model_copy.parent / "model.onnx.centers.npz"
    same = tmp_path / "same" / "model.onnx"  # the same bytes elsewhere: the same model
    same.parent.mkdir()
    shutil.copyfile(model_copy, same)
    shutil.copyfile(centers_file, str(same) + ".centers.npz")
    with running(same) as client:
        assert client.get("/v1/centers").json()["version"] == 1
    proto = onnx.load(str(model_copy))
    proto.doc_string += " (another model)"
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    app = create_app(Settings(model=other, centers_file=centers_file))
    with pytest.raises(UserError, match="centers for another model"), TestClient(app):
        pass


def test_requests_in_flight_keep_the_centers_they_started_with(model_copy, pictures, monkeypatch):
    """A classify held back in decoding while a PUT completes answers with the old set;
    one that starts after the PUT returned answers with the new."""
    from center_embed.service import pipeline

    gate, started = threading.Event(), threading.Event()
    decode = pipeline.decode_part

    def held_decode(part, *args):
        if "held.png" in part.name:
            started.set()
            assert gate.wait(20)
        return decode(part, *args)

    monkeypatch.setattr(pipeline, "decode_part", held_decode)
    held = [("files", ("held.png", pictures[0], "image/png"))]
    answers: dict[str, dict] = {}
    with running(model_copy) as client:
        thread = threading.Thread(
            target=lambda: answers.update(old=client.post("/v1/classify", files=held).json())
        )
        thread.start()
        assert started.wait(20)
        put = client.put("/v1/centers/zebra", files=files(*pictures[:4]), headers=ADMIN_AUTH)
        assert put.json()["version"] == 1
        gate.set()
        thread.join(20)
        new = client.post("/v1/classify", files=files(pictures[0])).json()
    assert answers["old"]["model"]["centers_version"] == 0
    assert set(answers["old"]["results"][0]["distances"]) == {"red", "green", "blue"}
    assert new["model"]["centers_version"] == 1
    assert set(new["results"][0]["distances"]) == {"red", "green", "blue", "zebra"}


def test_concurrent_classify_during_enrolment_never_sees_a_torn_set(model_copy, pictures):
    """Classify in a loop from threads while zebra is enrolled and removed over and over on a
    live server: every answer's classes are exactly those of the version it reports."""
    from center_embed.service.app import create_app
    from center_embed.service.settings import Settings

    app = create_app(Settings(model=model_copy, admin_keys=[ADMIN], max_wait_ms=1))
    expected = {"red", "green", "blue"}
    seen: list[tuple[int, frozenset, int]] = []
    stop = threading.Event()
    with serve_in_thread(app) as live:

        def classify() -> None:
            with httpx.Client(base_url=live.url, timeout=30) as http:
                while not stop.is_set():
                    body = http.post("/v1/classify", files=files(pictures[1])).json()
                    names = frozenset(body["results"][0]["distances"])
                    summary = body["model"]
                    seen.append((summary["centers_version"], names, summary["num_classes"]))

        threads = [threading.Thread(target=classify) for _ in range(3)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=live.url, headers=ADMIN_AUTH, timeout=30) as admin:
            for _ in range(6):
                assert admin.put("/v1/centers/zebra", files=files(*pictures[:5])).status_code == 200
                assert admin.delete("/v1/centers/zebra").status_code == 200
        stop.set()
        for t in threads:
            t.join(30)
    assert len(seen) > 10 and len({v for v, _, _ in seen}) > 2
    for version, names, count in seen:
        want = expected | {"zebra"} if version % 2 else expected  # odd: zebra enrolled
        assert names == want and count == len(want), (version, names, count)


def test_add_images_and_replace_a_trained_class(model_copy, pictures):
    with running(model_copy) as client:
        client.put("/v1/centers/zebra", files=files(*pictures[:2]), headers=ADMIN_AUTH)
        added = client.put("/v1/centers/zebra?mode=add", files=files(*pictures[2:5]),
                           headers=ADMIN_AUTH).json()  # fmt: skip
        centers = client.get("/v1/centers").json()["centers"]
        replaced = client.put("/v1/centers/red", files=files(*pictures[5:8]), headers=ADMIN_AUTH)
        red = next(
            c for c in client.get("/v1/centers").json()["centers"] if c["class_name"] == "red"
        )
    assert added["action"] == "add" and added["images"] == 5 and added["version"] == 2
    np.testing.assert_allclose(
        centers[3]["center"], embeddings_of(model_copy, pictures[:5]).mean(0), rtol=1e-4, atol=1e-5
    )
    assert replaced.json()["label"] == red["label"] and red["images"] == 3
    assert [c["class_name"] for c in centers].index("red") == red["label"]  # kept its label
    np.testing.assert_allclose(
        red["center"], embeddings_of(model_copy, pictures[5:8]).mean(0), rtol=1e-4, atol=1e-5
    )


def test_v2_infer_answers_with_the_enrolled_classes(model_copy, pictures):
    from center_embed.runtime import OnnxModel, RuntimeOptions

    pixels = np.stack(
        [OnnxModel(model_copy, RuntimeOptions(device="cpu")).decode(p) for p in pictures[:2]]
    )
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "distances"}, {"name": "labels"}]}  # fmt: skip
    with running(model_copy) as client:
        client.put("/v1/centers/zebra", files=files(*pictures[:2]), headers=ADMIN_AUTH)
        meta = client.get("/v2/models/center_embed").json()
        out = {o["name"]: o for o in client.post("/v2/models/center_embed/infer", json=body)
               .json()["outputs"]}  # fmt: skip
        v1 = client.post("/v1/classify", files=files(*pictures[:2])).json()["results"]
        centers = client.get("/v1/centers").json()
    assert next(o for o in meta["outputs"] if o["name"] == "distances")["shape"] == [-1, 4]
    assert out["distances"]["shape"] == [2, 4]
    names = [c["class_name"] for c in centers["centers"]]
    assert names[3] == "zebra"
    v1_rows = [[r["distances"][n] for n in names] for r in v1]
    np.testing.assert_allclose(np.reshape(out["distances"]["data"], (2, 4)), v1_rows, rtol=1e-5)
    assert out["labels"]["data"] == [r["label"] for r in v1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD = "\x00"


@pytest.mark.parametrize(
    "method, path, kwargs, headers, status, code",
    [
        ("PUT", "/v1/centers/", {"files": "one"}, ADMIN_AUTH, 422, "bad_class_name"),
        ("PUT", "/v1/centers/%20%20", {"files": "one"}, ADMIN_AUTH, 422, "bad_class_name"),
        ("PUT", "/v1/centers/" + "x" * 129, {"files": "one"}, ADMIN_AUTH, 422, "bad_class_name"),
        ("PUT", "/v1/centers/a%0Ab", {"files": "one"}, ADMIN_AUTH, 422, "bad_class_name"),
        ("PUT", "/v1/centers/a%00b", {"files": "one"}, ADMIN_AUTH, 422, "bad_class_name"),
        ("PUT", "/v1/centers/a%2Fb", {"files": "one"}, ADMIN_AUTH, 422, "bad_class_name"),
        ("PUT", "/v1/centers/zebra", {"files": "corrupt"}, ADMIN_AUTH, 400, "bad_image"),
        ("PUT", "/v1/centers/zebra", {"files": "none"}, ADMIN_AUTH, 422, "validation_error"),
        ("PUT", "/v1/centers/zebra", {"json": {"images": []}}, ADMIN_AUTH, 422,
         "validation_error"),
        ("PUT", "/v1/centers/zebra", {"files": "too_many"}, ADMIN_AUTH, 413, "too_many_images"),
        ("PUT", "/v1/centers/zebra?mode=merge", {"files": "one"}, ADMIN_AUTH, 422,
         "validation_error"),
        ("PUT", "/v1/centers/red?mode=add", {"files": "one"}, ADMIN_AUTH, 409,
         "cannot_add_to_trained_class"),
        ("PUT", "/v1/centers/zebra", {"files": "one"}, {}, 401, "unauthorized"),
        ("PUT", "/v1/centers/zebra", {"files": "one"}, {"Authorization": f"Bearer {API_KEY}"},
         401, "unauthorized"),
        ("DELETE", "/v1/centers/okapi", {}, ADMIN_AUTH, 404, "class_not_found"),
        ("DELETE", "/v1/centers/%01", {}, ADMIN_AUTH, 422, "bad_class_name"),
        ("DELETE", "/v1/centers/red", {}, {}, 401, "unauthorized"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_that_changes_nothing(
    model_copy, pictures, method, path, kwargs, headers, status, code
):
    bodies = {
        "one": files(pictures[0]),
        "corrupt": files(pictures[0], b"\x89PNG\r\n\x1a\n not really"),
        "none": [("other", ("x.txt", b"hello", "text/plain"))],
        "too_many": files(*[pictures[0]] * 3),
    }
    if "files" in kwargs:
        kwargs = {"files": bodies[kwargs["files"]]}
    with running(model_copy, api_keys=[API_KEY], max_images=2) as client:
        before = client.get("/v1/centers", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        response = client.request(method, path, headers=headers, **kwargs)
        after = client.get("/v1/centers", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert after == before
    assert not (model_copy.parent / "model.onnx.centers.npz").exists()


def test_removing_the_last_class_is_refused(model_copy):
    with running(model_copy) as client:
        assert client.delete("/v1/centers/red", headers=ADMIN_AUTH).status_code == 200
        assert client.delete("/v1/centers/green", headers=ADMIN_AUTH).json()["version"] == 2
        before = (model_copy.parent / "model.onnx.centers.npz").read_bytes()
        last = client.delete("/v1/centers/blue", headers=ADMIN_AUTH)
        assert last.status_code == 409 and last.json()["error"] == {
            "code": "cannot_remove_last_class",
            "message": "'blue' is the last class; a model needs one",
        }
        assert [c["class_name"] for c in client.get("/v1/centers").json()["centers"]] == ["blue"]
    assert (model_copy.parent / "model.onnx.centers.npz").read_bytes() == before


def test_enrolment_is_off_without_admin_keys(model_copy, pictures):
    with running(model_copy, admin_keys=[]) as client:
        response = client.put("/v1/centers/zebra", files=files(pictures[0]), headers=ADMIN_AUTH)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "enrolment_disabled"
        assert "CENTER_EMBED_ADMIN_KEYS" in response.json()["error"]["message"]
        assert client.delete("/v1/centers/red").status_code == 403
    assert not (model_copy.parent / "model.onnx.centers.npz").exists()


def test_base64_enrolment_and_the_python_client(model_copy, pictures):
    from center_embed.service.app import create_app
    from center_embed.service.client import Client, Conflict, Unauthorized
    from center_embed.service.settings import Settings

    app = create_app(Settings(model=model_copy, admin_keys=[ADMIN], max_wait_ms=1))
    with serve_in_thread(app) as live:
        via_json = httpx.put(f"{live.url}/v1/centers/okapi", headers=ADMIN_AUTH,
                             json={"images": [_b64(p) for p in pictures[:3]]})  # fmt: skip
        assert via_json.json()["images"] == 3
        with Client(live.url) as client:
            with pytest.raises(Unauthorized):
                client.enroll("zebra", pictures[:2])
            answer = client.enroll("zebra", pictures[:4], admin_key=ADMIN)
            assert answer["version"] == 2 and answer["label"] == 4
            names, centers = client.centers()
            assert names[-1] == "zebra" and centers.shape == (5, 16)
            assert client.classify(pictures[0])[0].distances.keys() >= {"zebra", "okapi"}
            assert client.enroll("zebra", pictures[4:6], mode="add", admin_key=ADMIN)[
                "images"] == 6  # fmt: skip
            assert client.remove("zebra", admin_key=ADMIN)["version"] == 4
            with pytest.raises(Conflict, match="trained class"):
                client.enroll("red", pictures[:1], mode="add", admin_key=ADMIN)
        with Client(live.url, api_key=ADMIN) as admin:
            assert admin.remove("okapi")["num_classes"] == 3


def test_a_class_of_atypical_images_accepts_its_own_kind(model_copy):
    """Flat greys are atypical for the tiny model (an atypicality near 100, part of every
    distance): before enrolment they are unknown; a class enrolled from them over HTTP gets
    a threshold that includes their atypicality, so more of them are answered as that class
    and known, after a restart too (the centers file keeps the images' atypicality)."""
    greys = np.r_[np.linspace(60, 200, 10), 95, 165].astype(np.uint8)  # the last two held out
    flats = [encode(np.full((32, 32, 3), g, np.uint8)) for g in greys]
    with running(model_copy) as client:
        before = client.post("/v1/classify", files=files(*flats[10:])).json()["results"]
        put = client.put("/v1/centers/flat", files=files(*flats[:10]), headers=ADMIN_AUTH)
        assert put.status_code == 200, put.text
        after = client.post("/v1/classify", files=files(*flats[10:])).json()["results"]
    assert all(r["unknown"] and r["atypicality"] > 1 for r in before)
    assert put.json()["unknown_threshold"] > min(r["atypicality"] for r in before)
    assert [(r["class_name"], r["unknown"]) for r in after] == [("flat", False)] * 2
    with running(model_copy) as client:  # a new app on the same centers file
        again = client.post("/v1/classify", files=files(*flats[10:])).json()["results"]
    assert [(r["class_name"], r["unknown"]) for r in again] == [("flat", False)] * 2
