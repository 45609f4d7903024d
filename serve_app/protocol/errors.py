"""OpenAI's error shape, `{"error": {message, type, param, code}}`, for every failure."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import StatusError

RETRY_AFTER_S = 1
# A replica died (killed, crashed, its node gone) with the request on it, or the result it
# made was lost with its node.
REPLICA_FAILURES = (
    RayActorError,
    ReplicaUnavailableError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
)
logger = logging.getLogger("ray.serve")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error to answer with `status` and OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = headers


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=error.body).model_dump(),
        status_code=error.status,
        headers=error.headers,
    )


def replica_failed() -> APIError:
    return APIError(
        503,
        "The model replica serving this request failed; retry.",
        type="unavailable",
        code="replica_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _field_path(loc: tuple) -> str | None:
    """`body.input.list[constrained-str].0` -> `input.0`: field names and indices only."""
    parts = [
        str(p) for p in loc[1:] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier())
    ]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    param = _field_path(tuple(problems[0].get("loc", ()))) if problems else None
    # A union field fails once per alternative: report them together.
    messages = dict.fromkeys(
        p.get("msg", "invalid") for p in problems if _field_path(tuple(p.get("loc", ()))) == param
    )
    message = " or ".join(list(messages)[:3]) or "Invalid request"
    return APIError(
        400, f"{param}: {message}" if param else message, param=param, code="invalid_value"
    )


# What FastAPI raises for a body it could not decode at all, and what this API says instead.
FASTAPI_BODY_ERROR = "There was an error parsing the body"
UNPARSABLE = "The request body could not be read as JSON: invalid UTF-8, or too deeply nested."

_STATUS_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def install(app: FastAPI) -> None:
    """Route every error the app can raise through OpenAI's shape; nothing leaks as plain text."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StatusError)
    async def _domain(_: Request, exc: StatusError) -> JSONResponse:
        # Raised in another deployment, it arrives wrapped; `cause` is the original.
        cause = getattr(exc, "cause", exc)
        message = str(cause.args[0]) if cause.args else type(cause).__name__
        headers = {"Retry-After": str(RETRY_AFTER_S)} if cause.status == 503 else None
        return error_response(
            APIError(cause.status, message, cause.type, code=cause.code, headers=headers)
        )

    for failure in REPLICA_FAILURES:

        @app.exception_handler(failure)
        async def _replica(_: Request, exc: Exception) -> JSONResponse:
            return error_response(replica_failed())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
            # Not UTF-8, nested past the parser's recursion limit, an integer too long, ...
            return error_response(APIError(400, UNPARSABLE, code="invalid_json"))
        kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(BackPressureError)
    async def _overloaded(_: Request, exc: BackPressureError) -> JSONResponse:
        return error_response(
            APIError(
                503,
                "The server is overloaded; retry shortly.",
                type="overloaded",
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # The client learns only the type; the log keeps the traceback.
        logger.error("Unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(APIError(500, f"Internal error: {type(exc).__name__}", "api_error"))
