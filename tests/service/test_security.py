"""API keys (header, key file, never logged or echoed) and CORS (off unless configured)."""

from __future__ import annotations

import logging

import pytest

from center_embed.errors import UserError
from center_embed.service.app import create_app
from center_embed.service.settings import Settings
from tests.helpers import (
    API_KEY,
    answer,
    error,
    multipart,
    running,
)


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


def test_bad_settings_never_echo_keys(tiny_onnx, monkeypatch, capsys):
    from center_embed.cli import main

    monkeypatch.setenv("CENTER_EMBED_MODEL", "")  # serve sets it; restored afterwards
    monkeypatch.setenv("CENTER_EMBED_API_KEYS", "very-secret")
    monkeypatch.setenv("CENTER_EMBED_MAX_BATCH", "0")
    assert main(["serve", str(tiny_onnx)]) == 1
    err = capsys.readouterr().err
    assert "CENTER_EMBED_MAX_BATCH" in err and "very-secret" not in err
