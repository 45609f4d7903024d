"""Store errors: what each answers over HTTP, raised in another deployment, and that they
import without the web framework."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from serve_app.errors import (
    CollectionChanged,
    CollectionNotFound,
    StoreBusy,
    StoreError,
    StoreUnavailable,
)
from serve_app.protocol import errors


def test_store_errors_import_without_fastapi():
    code = "import sys, serve_app.store.vector_store; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (CollectionNotFound("no such collection"), 404, "collection_not_found", None),
        (CollectionChanged("deleted meanwhile"), 409, "collection_changed", None),
        (StoreBusy("busy"), 503, "store_busy", "1"),
        (StoreUnavailable("down"), 503, "store_unavailable", "1"),
    ],
)
def test_a_store_error_from_another_deployment_answers_its_status(
    error: StoreError, status: int, code: str, retry_after: str | None
):
    app = FastAPI()
    errors.install(app)

    @app.get("/fail")
    async def fail():
        # As a deployment handle raises it: wrapped, the original as `cause`.
        raise RayTaskError("ingest", "traceback", error).as_instanceof_cause()

    answer = TestClient(app).get("/fail")
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
    assert answer.json()["error"]["message"] == error.args[0]
    assert answer.headers.get("retry-after") == retry_after
