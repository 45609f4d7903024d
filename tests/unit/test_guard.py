"""The Guard on a small FastAPI app with the same errors: API keys (loaded at construction,
failing closed), the Host allow-list, Serve's control headers, WebSocket and lifespan scopes,
and how bodies may arrive (size, time, bytes in flight)."""

import asyncio
import re
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import State
from starlette.websockets import WebSocketDisconnect

from serve_app.config import AppConfig, AuthConfig, IngressLive, overlay
from serve_app.http.guard import (
    CONTROL_HEADERS,
    AllowedHosts,
    APIKeys,
    Guard,
    apply_settings,
    bind_host,
)
from serve_app.protocol import errors

LOCAL = "http://localhost:8000"  # a Host the default settings allow


def make_app(user_config: dict | None = None, bind: str = "127.0.0.1", apply: bool = True):
    app = FastAPI()
    errors.install(app)
    app.add_middleware(Guard)
    if apply:
        apply_settings(app.state, overlay(IngressLive(), user_config), bind)

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return {"size": len(body["text"])}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.websocket("/v1/socket")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    return app


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  \n")
    return path


@pytest.fixture
def no_env_keys(monkeypatch):
    monkeypatch.delenv("RAG_API_KEYS", raising=False)


# --- API keys -------------------------------------------------------------------------------


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


def test_no_keys_configured_means_open(no_env_keys):
    client = TestClient(make_app(), base_url=LOCAL)
    assert client.post("/v1/echo", json={"text": "x"}).status_code == 200


def test_a_configured_key_file_that_is_missing_fails_loudly(tmp_path):
    with pytest.raises(FileNotFoundError):
        APIKeys.load(AuthConfig(api_keys_file=tmp_path / "absent"))


def test_v1_routes_need_a_key_probes_do_not(monkeypatch):
    monkeypatch.setenv("RAG_API_KEYS", "s3cret")
    client = TestClient(make_app(), base_url=LOCAL)
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


def test_without_key_state_every_guarded_path_is_refused(monkeypatch):
    """Settings never applied: fail closed, even with no keys anywhere."""
    monkeypatch.delenv("RAG_API_KEYS", raising=False)
    client = TestClient(make_app(apply=False), base_url=LOCAL)
    answer = client.post("/v1/echo", json={"text": "x"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
    assert answer.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 200  # probes need no keys
    # Without settings the Host check falls back to the loopback names, not to any.
    refused = TestClient(make_app(apply=False), base_url="http://evil.example")
    assert refused.get("/healthz").status_code == 400


def test_an_ingress_started_without_user_config_loads_its_keys(monkeypatch):
    """Serve calls `reconfigure` only for a deployment with a user_config: the keys in the
    environment must be in force from the constructor on."""
    from serve_app.http import api, ingress

    cls = ingress.Ingress.func_or_class
    user_class = cls.__mro__[1]  # the class as written, under Serve's ASGI wrapper
    # Serve keeps a copy of the class and the module globals it uses; it serves api.app.
    scope = user_class.__init__.__globals__
    served = api.app

    async def open_store(config, name):
        return SimpleNamespace(url="postgresql://unused", timeout_s=1.0)

    monkeypatch.setenv("RAG_API_KEYS", "boot-key")
    monkeypatch.setitem(scope, "open_store", open_store)
    monkeypatch.setitem(scope, "PopularStore", lambda store: None)
    monkeypatch.setitem(scope, "Popular", lambda *args: None)

    async def compute_popular(replica):  # the Precompute job's work: none here
        return None

    monkeypatch.setitem(scope, "compute_popular", compute_popular)
    monkeypatch.setattr(served, "state", State())

    async def construct() -> None:
        await user_class.__init__(object.__new__(user_class), *[None] * 9, AppConfig())

    asyncio.run(construct())
    assert len(served.state.api_keys.digests) == 1
    answer = TestClient(served, base_url=LOCAL).get("/v1/models")
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    elsewhere = TestClient(served, base_url="http://evil.example").get("/v1/models")
    assert elsewhere.status_code == 400
    # With the key, the route reads the replica's state the constructor put in the app.
    listed = TestClient(served, base_url=LOCAL).get(
        "/v1/models", headers={"Authorization": "Bearer boot-key"}
    )
    assert listed.status_code == 200
    names = [m.name for m in AppConfig().models().values()]
    assert [card["id"] for card in listed.json()["data"]] == names


# --- Host ----------------------------------------------------------------------------------

LOOPBACK_ALLOWED = [
    "localhost",
    "localhost:8000",
    "LocalHost:1",
    "localhost.",
    "127.0.0.1",
    "127.0.0.1:8000",
    "[::1]",
    "[::1]:8000",
    "[0:0:0:0:0:0:0:1]:80",
]
REFUSED = [
    None,
    "",
    "evil.example",
    "evil.example:8000",
    "127.0.0.1.evil.example",
    "localhost.evil.example",
    "evil@localhost",
    "localhost@evil.example",
    "localhost/x",
    "localhost:80:80",
    "localhost:99999",
    "[::1",
    "::1",
    "[::2]",
    "127.0.0.2",
    "0.0.0.0",
]


@pytest.mark.parametrize("host", LOOPBACK_ALLOWED)
def test_default_hosts_are_the_loopback_names_with_any_port(host):
    assert AllowedHosts.build(None, "127.0.0.1").allows(host)


@pytest.mark.parametrize("host", REFUSED)
def test_other_hosts_are_refused(host):
    assert not AllowedHosts.build(None, "127.0.0.1").allows(host)


def test_the_bind_host_joins_the_defaults_and_a_wildcard_bind_allows_any():
    assert AllowedHosts.build(None, "10.0.0.5").allows("10.0.0.5:8000")
    assert AllowedHosts.build(None, "10.0.0.5").allows("localhost")
    assert not AllowedHosts.build(None, "10.0.0.5").allows("10.0.0.6")
    assert AllowedHosts.build(None, "::1").allows("[::1]:8000")  # a bare IPv6 bind address
    assert AllowedHosts.build(None, "Rag.Example.com").allows("rag.example.com")
    for wildcard in ["0.0.0.0", "::"]:
        assert AllowedHosts.build(None, wildcard).allows("rag.example.com")
    assert bind_host() == "127.0.0.1"  # no Ray here: Serve's default


def test_configured_hosts_replace_the_defaults():
    hosts = AllowedHosts.build(["rag.example.com", "api.example.com:443", "[::1]"], "127.0.0.1")
    assert hosts.allows("RAG.example.com") and hosts.allows("rag.example.com:8443")
    assert hosts.allows("api.example.com:443") and not hosts.allows("api.example.com:444")
    assert not hosts.allows("api.example.com") and hosts.allows("[::1]:1")
    assert not hosts.allows("localhost")
    assert AllowedHosts.build(["*"], "127.0.0.1").allows("anything.example")
    with pytest.raises(ValueError):
        overlay(IngressLive(), {"allowed_hosts": ["bad host"]})


LISTED = re.compile(r"rag\.example\.com\.*(?::([0-9]{1,5}))?", re.IGNORECASE)


@given(
    st.one_of(
        st.text(max_size=40),
        st.from_regex(r"(?i)rag\.example\.com\.?(:[0-9]{1,6})?", fullmatch=True),
    )
)
def test_a_name_is_allowed_only_if_listed(host):
    listed = LISTED.fullmatch(host)
    expected = listed is not None and int(listed.group(1) or 0) <= 65535
    assert AllowedHosts.build(["rag.example.com"], "127.0.0.1").allows(host) == expected


def test_a_refused_host_gets_400_in_the_error_shape(no_env_keys):
    client = TestClient(make_app(), base_url="http://attacker.example:8000")
    for answer in [client.post("/v1/echo", json={"text": "x"}), client.get("/healthz")]:
        assert answer.status_code == 400
        assert answer.json()["error"] == {
            "message": answer.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": "host",
            "code": "invalid_host",
        }
    listed = TestClient(make_app({"allowed_hosts": ["attacker.example"]}), base_url=client.base_url)
    assert listed.get("/healthz").status_code == 200


# --- Serve's control headers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "X-Request-Disconnect-Disabled",
        "x-request-timeout-seconds",
        "X_Request_Timeout_Seconds",
        "serve_multiplexed_model_id",
        "Serve-Multiplexed-Model-Id",
        "X-Session-Id",
    ],
)
def test_serve_control_headers_are_refused(no_env_keys, header):
    client = TestClient(make_app(), base_url=LOCAL)
    for answer in [
        client.post("/v1/echo", json={"text": "x"}, headers={header: "?1"}),
        client.get("/healthz", headers={header: "0"}),
    ]:
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["code"] == "invalid_header" and error["param"] == header.lower()


def test_the_control_headers_are_the_ones_serve_reads():
    from ray.serve._private import http_util

    assert {"x_request_timeout_seconds", "x_request_disconnect_disabled"} <= CONTROL_HEADERS
    # The proxy's own parsers act on exactly these names.
    headers = {b"x-request-disconnect-disabled": b"?1", b"x-request-timeout-seconds": b"0"}
    assert http_util.parse_disconnect_disabled_header(headers) is True
    assert http_util.parse_request_timeout_header(headers, 30.0) is None


# --- other scopes ---------------------------------------------------------------------------


def test_websockets_get_the_same_rules(monkeypatch):
    monkeypatch.setenv("RAG_API_KEYS", "s3cret")
    client = TestClient(make_app())
    key = {"Authorization": "Bearer s3cret"}
    with client.websocket_connect("ws://localhost:8000/v1/socket", headers=key) as socket:
        assert socket.receive_text() == "hello"
    refusals = [
        ("ws://localhost:8000/v1/socket", {}),  # no key
        ("ws://evil.example/v1/socket", key),
        ("ws://localhost:8000/v1/socket", {**key, "X-Session-Id": "pin"}),
    ]
    for url, headers in refusals:
        with (
            pytest.raises(WebSocketDisconnect) as closed,
            client.websocket_connect(url, headers=headers),
        ):
            pass
        assert closed.value.code == 1008


def test_lifespan_passes_and_unknown_scopes_do_not():
    started, reached = [], []
    app = make_app()

    @app.on_event("startup")
    async def startup() -> None:
        started.append(True)

    with TestClient(app, base_url=LOCAL):
        pass
    assert started == [True]

    async def inner(scope, receive, send) -> None:
        reached.append(scope["type"])

    asyncio.run(Guard(inner)({"type": "webtransport", "app": app}, None, None))
    assert reached == []


# --- bodies --------------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413_declared_or_streamed(no_env_keys):
    client = TestClient(make_app({"inputs": {"max_body_bytes": 2048}}), base_url=LOCAL)
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


class Upload:
    """One HTTP request driven by hand: the body pieces it sends, then a stall (or the end)."""

    def __init__(self, pieces: list[bytes], stall: bool) -> None:
        self.pieces, self.stall = list(pieces), stall
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        if self.pieces:
            piece = self.pieces.pop(0)
            more = bool(self.pieces) or self.stall
            return {"type": "http.request", "body": piece, "more_body": more}
        if self.stall:
            await asyncio.Event().wait()  # headers sent, the rest of the body never comes
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]


def scope(state: State) -> dict:
    headers = [(b"host", b"localhost:8000"), (b"content-type", b"application/octet-stream")]
    app = SimpleNamespace(state=state)
    return {"type": "http", "method": "POST", "path": "/v1/upload", "headers": headers, "app": app}


def test_stalled_bodies_get_408_and_hold_no_budget(no_env_keys):
    state = State()
    uploads = {"body_timeout_s": 0.2, "max_bytes_in_flight": 2**20}
    apply_settings(state, overlay(IngressLive(), {"uploads": uploads}), "127.0.0.1")
    bodies: list[bytes] = []

    async def inner(scope, receive, send) -> None:
        bodies.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = Guard(inner)

    async def run() -> tuple[Upload, Upload, Upload]:
        stalled = Upload([b"a" * 700_000], stall=True)
        stalling = asyncio.create_task(guard(scope(state), stalled.receive, stalled.send))
        await asyncio.sleep(0.05)
        assert guard.in_flight == 700_000  # bytes that arrived are counted, not declared ones
        over = Upload([b"c" * 400_000], stall=False)
        await guard(scope(state), over.receive, over.send)
        await stalling
        after = Upload([b"d" * 400_000], stall=False)
        await guard(scope(state), after.receive, after.send)
        return stalled, over, after

    stalled, over, after = asyncio.run(run())
    assert stalled.status == 408 and b"body_timeout" in stalled.sent[1]["body"]
    assert over.status == 503 and b"overloaded" in over.sent[1]["body"]
    assert (b"retry-after", b"1") in over.sent[0]["headers"]
    assert after.status == 200 and bodies == [b"d" * 400_000]
    assert guard.in_flight == 0  # every byte given back, whichever way the request ended
