"""Every bad request gets its exact status code and JSON error: bad images, bad
vectors, bad bodies, wrong routes, methods and query parameters."""

from __future__ import annotations

import json

import pytest

from tests.helpers import (
    CORRUPT,
    answer,
    b64,
    error,
    multipart,
    png_bomb,
    running,
)

JSON_TYPE = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("request_args", "status", "code", "message"),
    [
        pytest.param(
            {"files": multipart(b"hello, I am text\n", names=["notes.txt"])},
            400, "bad_image", 'files[0] ("notes.txt"): not an image format Pillow can read',
            id="text-file",
        ),
        pytest.param(
            {"files": multipart(b"ab", names=["two.bytes"])},  # shorter than any header check
            400, "bad_image", 'files[0] ("two.bytes"): not an image format Pillow can read',
            id="two-bytes",
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
