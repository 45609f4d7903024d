"""What every request passes before its route: its Host, its API key, Serve's control headers,
and how its body arrives (size, time, the bytes all bodies hold together).

A pure ASGI middleware in front of the ingress's FastAPI app. It reads the settings the
ingress holds now (`apply_settings` puts them in `app.state`, at construction and on every
`reconfigure`), so keys and limits change with a `serve deploy`, without a restart. Where
those settings are missing it refuses rather than guess: it fails closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.serve._private.constants import (
    SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,
    SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
    SERVE_MULTIPLEXED_MODEL_ID,
    SERVE_SESSION_ID,
)
from ray.serve.context import _get_global_client
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from serve_app.config import HOST_PATTERN, AuthConfig, IngressLive, InputLimits, Uploads
from serve_app.metrics import route_metrics
from serve_app.protocol.errors import RETRY_AFTER_S, APIError, error_response

# Probes and the API description stay open; every other path needs a key once keys are set.
OPEN_PATHS = frozenset({"/healthz", "/ready", "/openapi.json", "/docs", "/redoc"})


def _header_key(name: str) -> str:
    # Serve matches some of its headers with `-` and `_` taken as one (proxies rewrite them).
    return name.lower().replace("-", "_")


# Request headers Serve's proxy (or, with direct ingress, the replica) acts on before any of
# this app's code runs: a per-request timeout (0 turns it off), no cancellation when the
# client disconnects, and routing to a replica (session affinity, model multiplexing). They
# are refused rather than stripped: by the time the Guard sees the request Serve has already
# obeyed them, but a refused request ends before it takes a slot, so they have nothing to act on.
CONTROL_HEADERS = frozenset(
    _header_key(name)
    for name in (
        SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
        SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,
        SERVE_MULTIPLEXED_MODEL_ID,
        SERVE_SESSION_ID,
    )
)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "[::]", ""})
# The host Serve binds when its http_options say nothing.
DEFAULT_BIND_HOST = "127.0.0.1"
_HOST = re.compile(HOST_PATTERN)


@dataclass(frozen=True)
class APIKeys:
    """SHA-256 digests of the accepted keys; the keys themselves are not kept."""

    digests: tuple[bytes, ...] = ()

    @classmethod
    def load(cls, auth: AuthConfig) -> APIKeys:
        """Keys from the environment variable `auth.api_keys_env` (comma-separated) and from
        `auth.api_keys_file` (one per line; blank lines and `#` comments skipped)."""
        keys = [k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",")]
        if auth.api_keys_file is not None:
            lines = Path(auth.api_keys_file).expanduser().read_text().splitlines()
            keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return cls(tuple(_digest(k) for k in dict.fromkeys(keys) if k))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, authorization: str | None) -> bool:
        """Whether `Authorization: Bearer <key>` holds one of the keys. Every digest is
        compared, in constant time, whichever matches."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = _digest(key.strip())
        matched = False
        for accepted in self.digests:
            matched |= hmac.compare_digest(accepted, digest)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (name, port): lower case, no trailing dot, IP addresses in one
    spelling (`[0:0::1]` is `[::1]`). None for anything that is not a plain host[:port]."""
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    name, port = match.group(1).lower().rstrip("."), match.group(2)
    try:
        if name.startswith("["):
            name = f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
    except ValueError:
        return None
    number = int(port[1:]) if port else None
    if number is not None and number > 65535:
        return None
    return name, number


@dataclass(frozen=True)
class AllowedHosts:
    """The Host names the service answers to. A page on another site that has its name
    resolved to 127.0.0.1 (DNS rebinding) sends its own name as Host, so it gets a 400
    instead of the API; a client that means this service names it."""

    names: frozenset[str] = frozenset()  # any port
    with_ports: frozenset[tuple[str, int]] = frozenset()
    any: bool = False

    @classmethod
    def build(cls, configured: list[str] | None, bind_host: str) -> AllowedHosts:
        """`configured` (`*` for any), or by default the bind host and the loopback names. A
        wildcard bind serves names this cannot know, so it answers any Host: set
        `allowed_hosts` there (and API keys)."""
        if configured is None:
            bind = bind_host.strip().lower()
            if bind in WILDCARD_BINDS:
                return cls(any=True)
            if ":" in bind and not bind.startswith("["):  # a bare IPv6 address
                bind = f"[{bind}]"
            configured = [bind, *LOOPBACK_HOSTS]
        if "*" in configured:
            return cls(any=True)
        names, with_ports = set(), set()
        for entry in configured:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"Not a host name or address: {entry!r}")
            name, port = parsed
            if port is None:
                names.add(name)
            else:
                with_ports.add((name, port))
        return cls(frozenset(names), frozenset(with_ports))

    def allows(self, host: str | None) -> bool:
        if self.any:
            return True
        parsed = split_host(host) if host else None
        return parsed is not None and (parsed[0] in self.names or parsed in self.with_ports)


def bind_host() -> str:
    """The host Serve's HTTP proxies bind (`http_options.host`), asked of the Serve
    controller; Serve's default where there is no controller to ask."""
    if not ray.is_initialized():
        return DEFAULT_BIND_HOST
    try:
        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else DEFAULT_BIND_HOST
    except Exception:  # an unreachable controller must not stop the ingress from starting
        return DEFAULT_BIND_HOST


def apply_settings(state: Any, settings: IngressLive, bind: str) -> None:
    """Put what the Guard enforces in `state` (the app's): loaded API keys (a key file that
    cannot be read raises, failing the update), input limits, uploads and allowed hosts."""
    state.api_keys = APIKeys.load(settings.auth)
    state.input_limits = settings.inputs
    state.uploads = settings.uploads
    state.allowed_hosts = AllowedHosts.build(settings.allowed_hosts, bind)


UNAUTHORIZED = APIError(
    401,
    "Missing or unknown API key: send `Authorization: Bearer <key>`.",
    type="authentication_error",
    code="invalid_api_key",
    headers={"WWW-Authenticate": "Bearer"},
)
NOT_CONFIGURED = APIError(
    503,
    "The server's settings are not loaded yet; retry shortly.",
    type="unavailable",
    code="not_ready",
    headers={"Retry-After": str(RETRY_AFTER_S)},
)
BAD_HOST = APIError(
    400,
    "This server does not answer to that Host; it must be one of its allowed_hosts.",
    param="host",
    code="invalid_host",
)


def busy() -> APIError:
    return APIError(
        503,
        "Too many request bodies are arriving at once; retry shortly.",
        type="overloaded",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def control_header(name: str) -> APIError:
    return APIError(
        400,
        f"The header `{name}` controls the server and may not be sent by clients.",
        param=name,
        code="invalid_header",
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than {limit} bytes.",
        code="request_too_large",
    )


def body_timeout(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request body did not arrive within {seconds:g} s.",
        code="body_timeout",
    )


def check(scope: Scope) -> APIError | None:
    """What a connection's head alone refuses it for (HTTP and WebSocket alike), or None."""
    state = scope["app"].state
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    hosts: AllowedHosts | None = getattr(state, "allowed_hosts", None)
    if hosts is None:  # before the settings are applied, only the loopback names
        hosts = AllowedHosts.build(None, DEFAULT_BIND_HOST)
    if not hosts.allows(headers.get("host")):
        return BAD_HOST
    path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
    if path not in OPEN_PATHS:
        keys: APIKeys | None = getattr(state, "api_keys", None)
        if keys is None:
            return NOT_CONFIGURED
        if keys and not keys.accepts(headers.get("authorization")):
            route_metrics().unauthorized.inc()
            return UNAUTHORIZED
    for name in headers:
        if _header_key(name) in CONTROL_HEADERS:
            return control_header(name)
    return None


class Guard:
    """Refuses a connection whose Host is not allowed (400), without a valid key where keys
    are set (401), or with a header meant for Serve (400), and a request to a full route (503,
    before its body is read: admission.py's `refuse_early`); then reads an HTTP body whole,
    within `max_body_bytes` (413), `body_timeout_s` (408) and the replica's
    `max_bytes_in_flight` (503), before the route parses any of it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0  # body bytes held by this replica's requests now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self.app(scope, receive, send)
        if kind not in ("http", "websocket"):
            return  # a kind of connection this service does not serve gets nothing
        refused = check(scope)
        if kind == "websocket":
            if refused is not None:  # closed before the handshake: the client sees a 403
                close = WebSocketClose(code=1008, reason=refused.body.code or "refused")
                return await close(scope, receive, send)
            return await self.app(scope, receive, send)
        state = scope["app"].state
        replica = getattr(state, "replica", None)
        if refused is None and replica is not None:
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            refused = replica.admission.refuse_early(scope["method"], path)
        if refused is not None:
            return await error_response(refused)(scope, receive, send)
        limits: InputLimits = getattr(state, "input_limits", InputLimits())
        uploads: Uploads = getattr(state, "uploads", Uploads())
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            error = APIError(400, "Invalid Content-Length header.", code="invalid_header")
            return await error_response(error)(scope, receive, send)
        if declared is not None and int(declared) > limits.max_body_bytes:
            return await error_response(too_large(limits.max_body_bytes))(scope, receive, send)
        body = bytearray()
        try:
            try:
                async with asyncio.timeout(uploads.body_timeout_s):
                    last = await self._read(receive, body, limits, uploads)
            except TimeoutError:
                error = body_timeout(uploads.body_timeout_s)
                return await error_response(error)(scope, receive, send)
            except APIError as error:
                return await error_response(error)(scope, receive, send)
            await self.app(scope, _replay(bytes(body), last, receive), send)
        finally:  # the body's bytes are held until the route is done with it
            self.in_flight -= len(body)

    async def _read(
        self, receive: Receive, body: bytearray, limits: InputLimits, uploads: Uploads
    ) -> Message | None:
        """Appends the body to `body`, counting it in `in_flight` as it arrives; the client's
        disconnect message if it left first."""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return message
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limits.max_body_bytes:
                raise too_large(limits.max_body_bytes)
            if self.in_flight + len(chunk) > uploads.max_bytes_in_flight:
                raise busy()
            body += chunk
            self.in_flight += len(chunk)
            more = message.get("more_body", False)
        return None


def _replay(body: bytes, last: Message | None, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then defers to the client's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if last is not None:
                return last
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
