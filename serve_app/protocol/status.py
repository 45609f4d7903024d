"""Domain errors that know their HTTP status, importable without FastAPI or Ray.

The store and the route deployments raise these; the ingress's error handler
(serve_app/protocol/errors.py) turns them into OpenAI's error shape.
"""

from __future__ import annotations


class StatusError(Exception):
    """A domain error that knows its HTTP status (e.g. the store's "collection not found")."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None
