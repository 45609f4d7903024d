"""API keys and the body size limit, on a small FastAPI app with the same Guard and errors."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.config import AuthConfig, InputLimits
from serve_app.guard import APIKeys, Guard
from serve_app.protocol import errors


def make_app(keys: APIKeys, limits: InputLimits | None = None) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.add_middleware(Guard)
    app.state.api_keys, app.state.input_limits = keys, limits or InputLimits()

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return {"size": len(body["text"])}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  \n")
    return path


def test_keys_come_from_the_environment_and_the_file(monkeypatch, key_file):
    monkeypatch.setenv("RAG_API_KEYS", "env-key, other-env-key,")
    keys = APIKeys.load(AuthConfig(api_keys_file=key_file))
    assert len(keys.digests) == 4
    for key in ["env-key", "other-env-key", "file-key-1", "file-key-2"]:
        assert keys.accepts(f"Bearer {key}") and keys.accepts(f"bearer  {key}")
    for header in [None, "", "Bearer", "Bearer ", "Basic env-key", "Bearer env-ke", "env-key"]:
        assert not keys.accepts(header)
    # The keys themselves are not kept, only their digests.
    assert "env-key" not in repr(keys) and b"env-key" not in b"".join(keys.digests)


def test_no_keys_configured_means_open(monkeypatch):
    monkeypatch.delenv("RAG_API_KEYS", raising=False)
    keys = APIKeys.load(AuthConfig())
    assert not keys
    assert TestClient(make_app(keys)).post("/v1/echo", json={"text": "x"}).status_code == 200


def test_a_configured_key_file_that_is_missing_fails_loudly(tmp_path):
    with pytest.raises(FileNotFoundError):
        APIKeys.load(AuthConfig(api_keys_file=tmp_path / "absent"))


def test_v1_routes_need_a_key_probes_do_not(monkeypatch):
    monkeypatch.setenv("RAG_API_KEYS", "s3cret")
    client = TestClient(make_app(APIKeys.load(AuthConfig())))
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
        answer = client.post("/v1/echo", json={"text": "x"}, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in answer.text
    ok = client.post("/v1/echo", json={"text": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.json() == {"size": 1}
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/v1/anything-else").status_code == 401  # unknown paths are not a probe


def test_bodies_over_the_limit_get_413_declared_or_streamed():
    client = TestClient(make_app(APIKeys(), InputLimits(max_body_bytes=2048)))
    assert client.post("/v1/echo", json={"text": "a" * 1000}).json() == {"size": 1000}
    declared = client.post("/v1/echo", json={"text": "a" * 5000})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the body arrives in pieces
        yield b'{"text": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'

    json = {"Content-Type": "application/json"}
    streamed = client.post("/v1/echo", content=chunks(), headers=json)
    assert streamed.status_code == 413
    small = client.post("/v1/echo", content=iter([b'{"text": ', b'"abc"}']), headers=json)
    assert small.json() == {"size": 3}
    bad = client.post("/v1/echo", content=b"{}", headers={"Content-Length": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_header"
