"""Domain errors that know their HTTP status, importable without FastAPI or Ray.

The store, the engines and the pipeline deployments raise these; the HTTP layer's error handler
(serve_app/protocol/errors.py) turns them into OpenAI's error shape.
"""

from __future__ import annotations


class StatusError(Exception):
    """A domain error that knows its HTTP status (e.g. the store's "collection not found")."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None


class QuestionTooLong(StatusError):
    status = 400
    code = "input_too_long"


class TooManyChunks(StatusError):
    status = 400
    code = "too_many_inputs"


class StoreError(StatusError):
    """A request the store cannot honour; `status` is the HTTP status it maps to."""


class CollectionNotFound(StoreError):
    status = 404
    type = "not_found_error"
    code = "collection_not_found"


class ModelMismatch(StoreError):
    status = 409
    code = "embedding_model_mismatch"


class TextSearchMismatch(StoreError):
    status = 409
    code = "text_search_config_mismatch"


class CollectionChanged(StoreError):
    """The collection was deleted (or recreated) while the request ran: nothing of it was
    stored. Sending it again is safe."""

    status = 409
    code = "collection_changed"


class InvalidData(StoreError):
    status = 400
    code = "invalid_value"


class StoreUnavailable(StoreError):
    """The database cannot be reached now; nothing of the call was committed."""

    status = 503
    type = "unavailable"
    code = "store_unavailable"


class StoreBusy(StoreUnavailable):
    """A lock this call needs stayed taken past `lock_timeout` (a new collection's index)."""

    code = "store_busy"
