"""Popular queries over HTTP: counted in PostgreSQL, precomputed by the Precompute job at
background priority, answered from the ingress's memory, invalidated when the collection
changes."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from ray import serve

from serve_app.store.embedded import embedded_url
from tests.integration.conftest import DATA_DIR, configure_ingress, ingress_config, redeploy

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def no_popular_queries(server):
    """Counts and answers of other tests' requests neither rank here nor outlive this module.
    DELETE, not TRUNCATE: its row triggers notify the ingress to drop the answers."""

    def clear():
        with psycopg.connect(embedded_url(DATA_DIR), autocommit=True) as conn:
            conn.execute("DELETE FROM precomputed_answers")
            conn.execute("DELETE FROM query_counts")

    clear()
    yield
    clear()


DOCUMENTS = [
    {"id": "paris", "text": "Paris is the capital and largest city of France."},
    {"id": "berlin", "text": "Berlin is the capital of Germany and its most populous city."},
    {"id": "bread", "text": "Bread is made from flour, water, salt and yeast."},
    {"id": "tides", "text": "Tides are caused by the pull of the Moon and the Sun."},
]
QUESTION = "What is the capital of France?"


def precompute():
    return serve.get_deployment_handle("Precompute", "rag")


def run_pass(expect_ranked: int) -> dict:
    """One pass of the job, once the ingress has flushed at least `expect_ranked` requests'
    counts (every 0.5 s in the test config)."""
    deadline = time.monotonic() + 30
    while True:
        outcome = precompute().run.remote().result()
        if outcome["ranked"] >= expect_ranked or time.monotonic() > deadline:
            return outcome
        time.sleep(0.5)


def setup_collection(client, name: str) -> None:
    client.delete(f"/v1/collections/{name}")
    response = client.post("/v1/documents", json={"collection": name, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text


def search(client, collection: str, query: str = QUESTION):
    response = client.post(
        "/v1/search", json={"collection": collection, "query": query, "top_k": 2}
    )
    assert response.status_code == 200, response.text
    return response


def rag(client, collection: str, query: str = QUESTION, **extra):
    body = {"collection": collection, "query": query, "max_tokens": 12, **extra}
    response = client.post("/v1/rag/query", json=body)
    assert response.status_code == 200, response.text
    return response


def test_popular_answers_are_precomputed_served_and_invalidated(client):
    setup_collection(client, "popular")
    first = search(client, "popular").json()
    search(client, "popular", "  what is the CAPITAL of france?")  # the same, normalized
    asked = rag(client, "popular").json()
    rag(client, "popular", QUESTION.lower())
    assert not first["cached"] and not asked["cached"]

    outcome = run_pass(expect_ranked=2)
    assert outcome["computed"] == 2 and outcome["failed"] == 0

    hit = search(client, "popular", "WHAT IS THE CAPITAL OF FRANCE?")
    body = hit.json()
    assert body["cached"] and body["cache"]["source"] == "precomputed"
    assert 0 <= body["cache"]["age_s"] < 60 and int(hit.headers["age"]) >= 0
    assert [r["chunk_id"] for r in body["results"]] == [r["chunk_id"] for r in first["results"]]

    answer = rag(client, "popular").json()
    assert answer["cache"]["source"] == "precomputed"
    assert answer["answer"] == asked["answer"]  # greedy decoding: the same answer
    assert answer["citations"] == asked["citations"]
    streamed = rag(client, "popular", stream=True).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line[6:7] == "{"]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == asked["answer"]
    assert events[-1]["type"] == "done" and events[-1]["cache"]["source"] == "precomputed"
    assert streamed.rstrip().endswith("data: [DONE]")

    status = client.get("/v1/status").json()["precompute"]
    assert status["subscribed"] and status["answers"]["search"] >= 1
    assert status["hits"]["search"] >= 1 and status["hits"]["rag"] >= 2

    # A change to the collection invalidates its answers at once.
    extra = {"id": "lyon", "text": "Lyon is a large city in France."}
    ingested = client.post("/v1/documents", json={"collection": "popular", "documents": [extra]})
    assert ingested.status_code == 200
    after = search(client, "popular").json()
    assert after["cache"] is None or after["cache"]["source"] != "precomputed"
    assert not rag(client, "popular").json()["cached"]

    # The next pass computes them again, for the new version.
    assert run_pass(expect_ranked=2)["computed"] == 2
    assert search(client, "popular").json()["cache"]["source"] == "precomputed"

    assert client.delete("/v1/collections/popular").status_code == 200
    gone = client.post("/v1/search", json={"collection": "popular", "query": QUESTION})
    assert gone.status_code == 404


@pytest.fixture
def restore(client):
    yield
    configure_ingress(client, ingress_config())
    redeploy()


def test_background_work_yields_its_slot_to_a_client(client, restore):
    """With one RAG slot and no queue, a client arriving while the job computes an answer is
    answered (the job's call is cancelled), where another client would get 503."""
    configure_ingress(client, {"routes": {"rag": {"max_running": 1, "max_queued": 0}}})
    setup_collection(client, "yielding")  # new: its answers are not computed yet
    for _ in range(2):
        rag(client, "yielding", "Why are there tides?", max_tokens=48)
    deadline = time.monotonic() + 30
    while client.get("/v1/status").json()["precompute"]["counts_pending"]:
        assert time.monotonic() < deadline, "the counts were never written"
        time.sleep(0.2)

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(lambda: precompute().run.remote().result())
        deadline = time.monotonic() + 30
        while client.get("/v1/status").json()["routes"]["rag"]["background"] == 0:
            assert time.monotonic() < deadline and not job.done(), "the job never started"
            time.sleep(0.05)
        answered = client.post(
            "/v1/rag/query",
            json={"collection": "yielding", "query": "Why are there tides?", "max_tokens": 48},
        )
        outcome = job.result()
    assert answered.status_code == 200, answered.text
    assert outcome["busy"] == 1  # the pass stopped there, to try again later
    assert client.get("/v1/status").json()["routes"]["rag"]["preempted"] >= 1


def test_schedule_runs_on_its_interval_and_changes_live(client, restore):
    before = client.get("/v1/status").json()["precompute"]["schedule"]
    assert before["interval_s"] == 3600
    # min_count: nothing ranks, so these passes compute nothing other tests would see.
    redeploy([{"name": "Precompute", "user_config": {"interval_s": 1, "min_count": 10**9}}])
    deadline = time.monotonic() + 60
    seen = set()
    while len(seen) < 2:  # two passes of its own
        schedule = client.get("/v1/status").json()["precompute"]["schedule"]
        if schedule["interval_s"] == 1 and schedule["last_pass"]:
            seen.add(schedule["last_pass"]["started_at"])
        assert time.monotonic() < deadline, "the schedule never ran"
        time.sleep(0.5)
