"""What every request passes before its route: its API key, and the size of its body.

A pure ASGI middleware in front of the ingress's FastAPI app. It reads the settings the
ingress holds now (`Ingress.reconfigure` puts them in `app.state`), so keys and limits change
with a `serve deploy`, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import AuthConfig, InputLimits
from serve_app.metrics import route_metrics
from serve_app.protocol.errors import APIError, error_response

# Probes and the API description stay open; every other path needs a key once keys are set.
OPEN_PATHS = frozenset({"/healthz", "/ready", "/openapi.json", "/docs", "/redoc"})


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


UNAUTHORIZED = APIError(
    401,
    "Missing or unknown API key: send `Authorization: Bearer <key>`.",
    type="authentication_error",
    code="invalid_api_key",
    headers={"WWW-Authenticate": "Bearer"},
)


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than {limit} bytes.",
        code="request_too_large",
    )


class Guard:
    """Checks the API key (when keys are set), then bounds the body at `max_body_bytes`: a
    larger declared or streamed body gets 413 before the route parses any of it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        keys: APIKeys = getattr(state, "api_keys", APIKeys())
        limits: InputLimits = getattr(state, "input_limits", InputLimits())
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if keys and path not in OPEN_PATHS and not keys.accepts(headers.get("authorization")):
            route_metrics().unauthorized.inc()
            return await error_response(UNAUTHORIZED)(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit()):
            error = APIError(400, "Invalid Content-Length header.", code="invalid_header")
            return await error_response(error)(scope, receive, send)
        if declared is not None and int(declared) > limits.max_body_bytes:
            return await error_response(too_large(limits.max_body_bytes))(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return await self.app(scope, _replay(bytes(body), message, receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limits.max_body_bytes:
                return await error_response(too_large(limits.max_body_bytes))(scope, receive, send)
        await self.app(scope, _replay(bytes(body), None, receive), send)


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
