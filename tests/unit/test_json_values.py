"""Any JSON value in a free-form field (ingest metadata, search and RAG filters) is either
refused with 400 or survives every place it goes: the answer (orjson), the response cache key,
the popular-query counts, and PostgreSQL's JSONB, which gives numbers back without exponents."""

import importlib.util
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.cache import ResponseCache
from serve_app.config import InputLimits
from serve_app.precompute.keys import ask
from serve_app.protocol import errors, limits
from serve_app.protocol.documents import (
    IngestRequest,
    RagRequest,
    RetrievalRequest,
    SearchRequest,
)

ROOT = Path(__file__).resolve().parents[2]
LIMITS = InputLimits(max_metadata_bytes=4096, max_filter_bytes=4096)
app = FastAPI()
errors.install(app)


def _stored(value: Any) -> Any:
    """`value` as JSON in a response, then as PostgreSQL stores and returns it (orjson raises
    where either would fail)."""
    return json.loads(orjson.dumps(value), parse_float=lambda s: json.loads(f"{Decimal(s):f}"))


@app.post("/ingest")
def ingest(request: IngestRequest) -> dict:
    limits.check_ingest(request, LIMITS)
    metadata = request.documents[0].metadata
    assert orjson.dumps(_stored(metadata)) is not None
    return {"metadata": _stored(metadata)}


def _retrieval(kind: str, request: RetrievalRequest) -> dict:
    limits.check_retrieval(request, LIMITS)
    cache = ResponseCache(cache=None, kind="search")  # type: ignore[arg-type]  # key() only
    cache.key("1:1:model", request.model_dump(mode="json", exclude={"collection"}))
    counted = ask(kind, request, "models")
    orjson.dumps(_stored(counted.request))
    return {"filters": _stored(request.filters)}


@app.post("/search")
def search(request: SearchRequest) -> dict:
    return _retrieval("search", request)


@app.post("/rag")
def rag(request: RagRequest) -> dict:
    return _retrieval("rag", request)


client = TestClient(app, raise_server_exceptions=False)

# The fuzzer's own generator of JSON values (scripts/fuzz.py), so both try the same ones.
spec = importlib.util.spec_from_file_location("fuzz", ROOT / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)
values = fuzz.json_values()


def _post(path: str, body: dict):
    # ensure_ascii spells lone surrogates as \\ud800, as a client's JSON may; NaN as NaN,
    # as Python's json accepts.
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _check(answer, sent: Any, field: str) -> None:
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 400:
        assert answer.json()["error"]["code"] in ("invalid_value", "input_too_long")
        return
    returned = answer.json()[field]
    assert fuzz.same_json(json.loads(json.dumps(sent)), returned)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(values)
def test_metadata_is_refused_or_round_trips(value):
    body = {"collection": "c", "documents": [{"text": "t", "metadata": {"k": value}}]}
    _check(_post("/ingest", body), {"k": value}, "metadata")


@SETTINGS
@given(values, st.sampled_from(["/search", "/rag"]))
def test_filters_are_refused_or_round_trip(value, path):
    body = {"collection": "c", "query": "q", "filters": {"k": value}}
    _check(_post(path, body), {"k": value}, "filters")


def test_the_known_breakers_are_refused():
    for value in (2**63, -(2**63) - 1, 2**64, 10**30, 1e19, float("inf"), "a\x00", "\ud800"):
        for path, body in (
            (
                "/ingest",
                {"collection": "c", "documents": [{"text": "t", "metadata": {"k": value}}]},
            ),
            ("/search", {"collection": "c", "query": "q", "filters": {"k": value}}),
            ("/rag", {"collection": "c", "query": "q", "filters": {"k": [value]}}),
        ):
            answer = _post(path, body)
            assert answer.status_code == 400, (value, path, answer.text)
    assert _post("/search", {"collection": "c", "query": "a\x00b"}).status_code == 400
    ok = {"k": [2**63 - 1, -(2**63), 9.2e18, 0.5, "é"]}
    assert _post("/search", {"collection": "c", "query": "q", "filters": ok}).status_code == 200


def test_metadata_and_filters_are_bounded_in_bytes():
    big = {"k": "x" * 5000}
    answer = _post("/ingest", {"collection": "c", "documents": [{"text": "t", "metadata": big}]})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "documents.0.metadata"
    answer = _post("/search", {"collection": "c", "query": "q", "filters": big})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "filters"
