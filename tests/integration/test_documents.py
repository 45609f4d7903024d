"""Ingestion, search and cited answers over HTTP, against the real embedded PostgreSQL."""

import json

import httpx
import pytest

from serve_app.store.embedded import stop_embedded
from tests.integration.conftest import DATA_DIR, redeploy

pytestmark = pytest.mark.integration

CORPUS = [
    {
        "id": "paris",
        "text": "Paris is the capital and largest city of France. It lies on the Seine.",
        "metadata": {"topic": "geography", "country": "fr"},
    },
    {
        "id": "berlin",
        "text": "Berlin is the capital of Germany and its most populous city.",
        "metadata": {"topic": "geography", "country": "de"},
    },
    {
        "id": "bread",
        "text": "Bread is made from flour, water, salt and yeast, then baked in an oven.",
        "metadata": {"topic": "cooking"},
    },
    {
        "id": "tides",
        "text": "Tides are caused by the gravitational pull of the Moon and the Sun.",
        "metadata": {"topic": "science"},
    },
]


def ingest(client, collection: str, documents: list[dict], **extra) -> dict:
    response = client.post(
        "/v1/documents", json={"collection": collection, "documents": documents, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()


def search(client, collection: str, query: str, **extra) -> dict:
    response = client.post("/v1/search", json={"collection": collection, "query": query, **extra})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def corpus(client_module):
    body = ingest(client_module, "facts", CORPUS)
    assert body["ingested"] == 4 and body["chunks"] == 4
    yield "facts"
    client_module.delete("/v1/collections/facts")


@pytest.fixture(scope="module")
def client_module(server):
    with httpx.Client(base_url=server, timeout=300) as c:
        yield c


def test_ingest_chunks_long_documents(client):
    text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(120))
    body = ingest(
        client, "long", [{"id": "doc", "text": text}], chunking={"max_tokens": 64, "overlap": 8}
    )
    assert body["documents"] == [{"id": "doc", "chunks": body["chunks"]}]
    assert body["chunks"] > 10
    # Without an id, the text's hash is the id: ingesting it twice stores it once.
    first = ingest(client, "long", [{"text": "no id here"}])["documents"][0]["id"]
    assert ingest(client, "long", [{"text": "no id here"}])["documents"][0]["id"] == first
    collections = {c["name"]: c for c in client.get("/v1/collections").json()["data"]}
    assert collections["long"]["documents"] == 2
    assert collections["long"]["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert client.delete("/v1/collections/long").status_code == 200
    assert "long" not in {c["name"] for c in client.get("/v1/collections").json()["data"]}


def test_search_orders_by_similarity(client, corpus):
    body = search(client, corpus, "What is the capital of France?", top_k=3)
    results = body["results"]
    assert results[0]["document_id"] == "paris"
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["metadata"]["country"] == "fr"
    assert body["timings"]["embed_ms"] > 0 and body["timings"]["search_ms"] > 0


def test_search_filters_by_metadata(client, corpus):
    results = search(client, corpus, "capital city", top_k=4, filters={"country": "de"})["results"]
    assert [r["document_id"] for r in results] == ["berlin"]
    results = search(client, corpus, "capital city", top_k=4, filters={"topic": "geography"})[
        "results"
    ]
    assert {r["document_id"] for r in results} == {"paris", "berlin"}


def test_search_with_rerank(client, corpus):
    body = search(client, corpus, "What causes tides?", top_k=4, rerank=True, rerank_top_n=2)
    results = body["results"]
    assert len(results) == 2
    assert results[0]["document_id"] == "tides"
    assert results[0]["rerank_score"] >= results[1]["rerank_score"]
    assert body["timings"]["rerank_ms"] > 0


def test_reingest_replaces_and_delete_removes(client):
    ingest(
        client,
        "edits",
        [{"id": "d", "text": "The old version mentions zebras.", "metadata": {"v": 1}}],
    )
    ingest(
        client,
        "edits",
        [{"id": "d", "text": "The new version mentions giraffes.", "metadata": {"v": 2}}],
    )
    results = search(client, "edits", "zebras", top_k=10)["results"]
    assert len(results) == 1  # replaced, not duplicated
    assert results[0]["text"] == "The new version mentions giraffes."
    assert results[0]["metadata"] == {"v": 2}
    assert client.delete("/v1/documents/edits/d").status_code == 200
    assert search(client, "edits", "giraffes", top_k=10)["results"] == []
    missing = client.delete("/v1/documents/edits/d")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "document_not_found"
    client.delete("/v1/collections/edits")


def test_deleting_a_missing_document_keeps_the_collections_cached_answers(client):
    """A 404 changes nothing, so the collection's cached results stay valid (they were all
    dropped before: the delete bumped the version anyway)."""
    ingest(client, "kept", [{"id": "a", "text": "Otters hold hands while they sleep."}])
    try:
        assert not search(client, "kept", "otters")["cached"]
        assert search(client, "kept", "otters")["cached"]
        missing = client.delete("/v1/documents/kept/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "document_not_found"
        assert search(client, "kept", "otters")["cached"]
        # A delete that removes something does invalidate them.
        assert client.delete("/v1/documents/kept/a").status_code == 200
        after = search(client, "kept", "otters")
        assert not after["cached"] and after["results"] == []
    finally:
        client.delete("/v1/collections/kept")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/search", {"collection": "nope", "query": "x"}, 404),
        ("post", "/v1/rag/query", {"collection": "nope", "query": "x"}, 404),
        ("delete", "/v1/collections/nope", None, 404),
        ("post", "/v1/documents", {"collection": "bad name!", "documents": [{"text": "x"}]}, 400),
        ("post", "/v1/documents", {"collection": "c", "documents": []}, 400),
        ("post", "/v1/documents", {"collection": "c", "documents": [{"text": ""}]}, 400),
        (
            "post",
            "/v1/documents",
            {"collection": "c", "documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
            400,
        ),
        (
            "post",
            "/v1/documents",
            {
                "collection": "c",
                "documents": [{"text": "x"}],
                "chunking": {"max_tokens": 32, "overlap": 40},
            },
            400,
        ),
        ("post", "/v1/search", {"collection": "c", "query": "x", "top_k": 0}, 400),
    ],
)
def test_bad_document_requests(client, method, path, body, status):
    response = client.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_rag_answers_with_citations(client, corpus):
    response = client.post(
        "/v1/rag/query",
        json={
            "collection": corpus,
            "query": "What is the capital of France?",
            "top_k": 4,
            "rerank": True,
            "rerank_top_n": 2,
            "max_tokens": 48,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"].strip()
    citations = body["citations"]
    assert [c["number"] for c in citations] == [1, 2]
    assert citations[0]["document_id"] == "paris"
    assert {c["document_id"] for c in citations} <= {d["id"] for d in CORPUS}
    assert "Paris" in body["answer"]
    timings = body["timings"]
    stages = ("embed_ms", "search_ms", "rerank_ms", "fit_ms", "first_token_ms", "generate_ms")
    assert all(timings[k] > 0 for k in stages)
    assert timings["first_token_ms"] <= timings["generate_ms"]
    assert body["usage"]["completion_tokens"] > 0


def test_rag_streams_tokens_then_citations(client, corpus):
    events = []
    with client.stream(
        "POST",
        "/v1/rag/query",
        json={
            "collection": corpus,
            "query": "What causes tides?",
            "max_tokens": 32,
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[-1]["type"] == "done"
    assert parsed[-1]["citations"][0]["document_id"] == "tides"
    assert "rerank_ms" not in parsed[-1]["timings"]  # RAG reranks only when asked
    assert sum(1 for e in parsed if e["type"] == "delta") > 2


def test_data_survives_a_restart(client, corpus):
    """The app and its embedded PostgreSQL restart; the ingested documents are still there."""
    from ray import serve

    serve.delete("rag")
    stop_embedded(DATA_DIR)
    redeploy()
    from serve_app.launch import wait_ready

    wait_ready(str(client.base_url))
    results = search(client, corpus, "What is the capital of France?", top_k=1)["results"]
    assert results[0]["document_id"] == "paris"
