"""Bounded inputs and state over HTTP: chunk windows and caps, JSON values the store cannot give
back, the sources a RAG prompt holds, and which requests count as popular."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import configure_ingress, ingress_config

pytestmark = pytest.mark.integration

WORDS = [f"word{i}" for i in range(599)] + ["zebrafinale"]


@pytest.fixture
def restore_ingress(client):
    yield
    configure_ingress(client, ingress_config())


def test_a_window_larger_than_the_model_keeps_its_overlap_in_proportion(client):
    # 1024/256 on a model of 256 tokens used to leave a stride of 1 (946 chunks of 600
    # words), and the text's last tokens in no chunk.
    body = {
        "collection": "windows",
        "documents": [{"id": "w", "text": " ".join(WORDS)}],
        "chunking": {"max_tokens": 1024, "overlap": 256},
    }
    answer = client.post("/v1/documents", json=body)
    assert answer.status_code == 200, answer.text
    chunks = answer.json()["chunks"]
    assert 2 <= chunks <= 30, chunks
    found = client.post(
        "/v1/search", json={"collection": "windows", "query": "zebrafinale", "top_k": 200}
    ).json()["results"]
    assert len(found) == chunks
    assert any("zebrafinale" in r["text"] for r in found)  # the last word is in a chunk
    client.delete("/v1/collections/windows")


def test_an_ingest_past_the_chunk_cap_is_refused(client):
    body = {
        "collection": "capped",
        "documents": [{"text": "word " * 200_000}],  # 12,500 chunks of 16 tokens
        "chunking": {"max_tokens": 16, "overlap": 0},
    }
    answer = client.post("/v1/documents", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "too_many_inputs"
    assert "capped" not in {c["name"] for c in client.get("/v1/collections").json()["data"]}


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/documents", {"documents": [{"text": "t", "metadata": {"n": 2**64}}]}),
        ("/v1/documents", {"documents": [{"text": "t", "metadata": {"n": 1e20}}]}),
        ("/v1/documents", {"documents": [{"text": "t", "metadata": {"s": "a\u0000"}}]}),
        ("/v1/documents", {"documents": [{"text": "t", "metadata": {"s": "x" * 20_000}}]}),
        ("/v1/search", {"query": "q", "filters": {"n": -(2**70)}}),
        ("/v1/search", {"query": "nul \u0000 query"}),
        ("/v1/rag/query", {"query": "q", "filters": {"n": [10**30]}, "max_tokens": 1}),
    ],
)
def test_json_the_store_cannot_give_back_is_refused(client, path, body):
    answer = client.post(path, json={"collection": "bounds", **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] in ("invalid_value", "input_too_long")


def test_rerank_top_n_null_keeps_the_cap_on_sources(client):
    documents = [{"id": f"d{i}", "text": f"Fact number {i} about rivers."} for i in range(30)]
    ingested = client.post("/v1/documents", json={"collection": "many", "documents": documents})
    assert ingested.status_code == 200, ingested.text
    body = {
        "collection": "many",
        "query": "rivers",
        "top_k": 100,
        "rerank": False,
        "rerank_top_n": None,
        "max_tokens": 1,
    }
    answer = client.post("/v1/rag/query", json=body)
    assert answer.status_code == 200, answer.text
    assert 1 <= len(answer.json()["citations"]) <= 20
    client.delete("/v1/collections/many")


def counted(client) -> int:
    precompute = client.get("/v1/status").json()["precompute"]
    return precompute["counts_pending"] + precompute["counts_written"]


def test_requests_refused_for_overload_are_not_counted(server, client, restore_ingress):
    client.post("/v1/documents", json={"collection": "counted", "documents": [{"text": "x"}]})
    configure_ingress(client, {"routes": {"search": {"max_running": 1, "max_queued": 0}}})
    before = counted(client)
    body = {"collection": "counted", "query": "a request asked in a burst"}
    with httpx.Client(base_url=server, timeout=60) as burst, ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(lambda _: burst.post("/v1/search", json=body).status_code, range(32))
        )
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    time.sleep(1.5)  # a flush of the counts
    assert counted(client) - before == statuses.count(200)
    client.delete("/v1/collections/counted")
