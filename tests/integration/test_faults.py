"""Faults under load, through real HTTP: replicas killed, PostgreSQL stopped, replicas replaced
by a redeploy. Idempotent routes hide a dead replica; the others fail cleanly, never hang."""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from serve_app.store.embedded import embedded_url, stop_embedded
from tests.integration.conftest import DATA_DIR, redeploy, wait_ready

pytestmark = pytest.mark.integration


def kill_replicas(deployment: str) -> int:
    """`ray.kill` every replica actor of `deployment`, as a crash would; Serve replaces them."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::rag#{deployment}#")
    ]
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return len(names)


class Load:
    """Clients posting `body(i)` to `path` in a loop, each answer kept, until stopped."""

    def __init__(self, server: str, path: str, body, clients: int = 4) -> None:
        self.answers: list[httpx.Response] = []
        self.stopped = threading.Event()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [
            self.pool.submit(self._run, server, path, body, k * 10_000) for k in range(clients)
        ]

    def _run(self, server, path, body, start) -> None:
        with httpx.Client(base_url=server, timeout=180) as client:
            i = start
            while not self.stopped.is_set():
                self.answers.append(client.post(path, json=body(i)))
                i += 1

    def stop(self) -> Counter:
        self.stopped.set()
        for future in self.futures:
            future.result(timeout=200)
        self.pool.shutdown()
        return Counter(a.status_code for a in self.answers)


def settle(server: str) -> None:
    """Every replica is back: /ready answers and no deployment is still replacing replicas."""
    wait_ready(server, timeout_s=300)
    with httpx.Client(base_url=server, timeout=30) as client:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            deployments = client.get("/v1/status").json()["deployments"]
            if all(d["status"] == "HEALTHY" for d in deployments.values()):
                return
            time.sleep(1)
    raise TimeoutError("the deployments did not become healthy again")


def test_a_killed_embedder_is_invisible_to_idempotent_routes(server, client):
    client.post(
        "/v1/documents",
        json={
            "collection": "faults",
            "documents": [{"id": "f", "text": "Lighthouses guide ships."}],
        },
    ).raise_for_status()
    embeddings = Load(server, "/v1/embeddings", lambda i: {"input": [f"kill test {i}", "two"]})
    searches = Load(
        server, "/v1/search", lambda i: {"collection": "faults", "query": f"ships {i}"}, 2
    )
    try:
        time.sleep(3)
        assert kill_replicas("Embedder") == 1
        time.sleep(12)  # through the replacement's start
    finally:
        embedded, searched = embeddings.stop(), searches.stop()
        settle(server)
    assert set(embedded) == {200} and set(searched) == {200}, (embedded, searched)
    assert embedded[200] > 20 and searched[200] > 5


def test_a_killed_generator_fails_its_requests_cleanly(server, client):
    body = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 48}
    chats = Load(server, "/v1/chat/completions", lambda i: {**body, "seed": i}, 3)
    streams: list[str] = []

    def stream() -> None:
        with httpx.Client(base_url=server, timeout=180) as c:
            for _ in range(3):
                streams.append(c.post("/v1/chat/completions", json={**body, "stream": True}).text)

    streamer = threading.Thread(target=stream)
    try:
        time.sleep(4)
        streamer.start()
        time.sleep(1.5)
        assert kill_replicas("Generator") == 1
        time.sleep(5)
    finally:
        streamer.join(timeout=200)
        codes = chats.stop()
        settle(server)
    assert set(codes) <= {200, 503}, codes
    failed = [a.json()["error"] for a in chats.answers if a.status_code == 503]
    assert failed, "a chat in flight when its replica died must fail"
    assert {e["code"] for e in failed} == {"replica_unavailable"}
    # Every stream ends; one cut by the dead replica says so in an error event first.
    assert streams and all(s.rstrip().endswith("data: [DONE]") for s in streams)
    assert any('"replica_unavailable"' in s for s in streams) or len(failed) > 0


def docs(n: int) -> list[dict]:
    return [
        {"id": f"doc-{i}", "text": " ".join(f"Fact {j} about item {i}." for j in range(150))}
        for i in range(n)
    ]


def test_postgres_stopped_during_ingest(server, client):
    ingest = {"collection": "outage", "documents": docs(24)}
    answer: dict = {}
    worker = threading.Thread(
        target=lambda: answer.update(r=client.post("/v1/documents", json=ingest))
    )
    try:
        worker.start()
        time.sleep(1.0)
        stop_embedded(DATA_DIR)
        worker.join(timeout=200)
        assert answer["r"].status_code == 503, answer["r"].text
        assert answer["r"].json()["error"]["code"] == "store_unavailable"
        assert answer["r"].headers["retry-after"]
        # Routes that need the database say so; the others keep working.
        down = client.post("/v1/search", json={"collection": "outage", "query": "item 3"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
        rag = client.post("/v1/rag/query", json={"collection": "outage", "query": "item 3"})
        assert rag.status_code == 503
        assert client.post("/v1/embeddings", json={"input": "still up"}).status_code == 200
        rerank = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert rerank.status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    finally:
        embedded_url(DATA_DIR)  # back up: the routes recover by themselves
    back = time.monotonic()
    while (listed := client.get("/v1/collections")).status_code != 200:
        assert listed.status_code == 503 and time.monotonic() - back < 10, listed.text
        time.sleep(0.2)
    collections = {c["name"]: c for c in listed.json()["data"]}
    assert collections.get("outage", {"documents": 0})["documents"] == 0  # nothing partial
    again = client.post("/v1/documents", json=ingest)
    assert again.status_code == 200 and again.json()["ingested"] == 24
    collections = {c["name"]: c for c in client.get("/v1/collections").json()["data"]}
    assert collections["outage"]["documents"] == 24
    hits = client.post("/v1/search", json={"collection": "outage", "query": "item 3"})
    assert hits.status_code == 200 and hits.json()["results"]


def test_in_flight_requests_finish_when_the_ingress_is_replaced(server, client):
    body = {"messages": [{"role": "user", "content": "Write a poem."}], "max_tokens": 64}
    with ThreadPoolExecutor(2) as pool:
        inflight = [pool.submit(client.post, "/v1/chat/completions", json=body) for _ in range(2)]
        time.sleep(1.0)
        # A new ray_actor_options makes Serve replace the ingress replica; the old one drains.
        redeploy([{"name": "Ingress", "ray_actor_options": {"num_cpus": 0.11}}])
        answers = [f.result(timeout=200) for f in inflight]
    try:
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["finish_reason"] in {"stop", "length"}
    finally:
        redeploy()
        settle(server)
