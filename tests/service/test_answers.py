"""What the routes answer, compared with onnxruntime run directly on the same decoded
pixels: /v1/classify, /v1/embed, /v1/distances, /v1/model and /v1/centers, and a model
file of format 1 (four outputs, no unknown scores, no atypicality)."""

from __future__ import annotations

import numpy as np
import pytest

from center_embed import contract
from center_embed.errors import UserError
from center_embed.runtime import OnnxModel, RuntimeOptions, describe
from tests.helpers import (
    b64,
    encode,
    expected,
    metric_value,
    multipart,
    running,
)


def check_results(
    results: list[dict], ref: dict[str, np.ndarray], names: list[str], vectors: bool = False
) -> None:
    assert len(results) == len(ref["labels"])
    for i, result in enumerate(results):
        assert result["label"] == int(ref["labels"][i])
        assert result["class_name"] == names[ref["labels"][i]]
        assert result["min_distance"] == pytest.approx(float(ref["min_distances"][i]), rel=1e-5)
        assert result["min_distance"] >= 0
        score = float(ref["unknown_scores"][i])
        assert result["unknown_score"] == pytest.approx(score, rel=1e-5, abs=1e-4)
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
    flags = reference.info.unknown(ref["unknown_scores"], ref["labels"])
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


def test_distances_agree_with_onnxruntime(client, reference, images):
    """A bare embedding has no image, so no atypicality: its distances are the image's, and
    its unknown score the image's less the image's atypicality (a flat colour has one: the
    tiny model gives it ~100)."""
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
    bare = {**ref, "unknown_scores": ref["unknown_scores"] - ref["atypicality"]}
    check_results(response.json()["results"], bare, reference.info.class_names, vectors=True)
    assert float(response.headers["x-queue-time"]) == 0
    assert float(response.headers["x-inference-time"]) > 0
    top1 = client.post("/v1/distances?top_k=1", json=payload).json()["results"]
    assert [list(r["distances"]) for r in top1] == [[r["class_name"]] for r in top1]


def test_a_format_1_file_is_served_as_it_declares(tiny_plain_onnx, images):
    """Four outputs (a file of format 1): /v1 answers with an atypicality of 0 and its min
    distance as the unknown score, /v2 declares and serves the four outputs only."""
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
    assert [r["unknown_score"] for r in results] == [r["min_distance"] for r in results]
    assert reference.info.format_version == 1
    assert [o["name"] for o in meta["outputs"]] == list(contract.FORMAT_1_OUTPUT_NAMES)
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
