"""Per-route limits, deadlines, load shedding and autoscaling, through real HTTP."""

import itertools
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import TEST_CONFIG, configure_ingress, ingress_config, redeploy

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def chat_body(tokens: int, i: int = 0) -> dict:
    content = f"Write a long story about a lighthouse keeper. ({i})"
    return {"messages": [{"role": "user", "content": content}], "max_tokens": tokens}


def timed_post(server: str, path: str, body: dict) -> tuple[httpx.Response, float]:
    with httpx.Client(base_url=server, timeout=300) as c:
        start = time.perf_counter()
        response = c.post(path, json=body)
        return response, time.perf_counter() - start


def burst(server: str, path: str, bodies: list[dict]) -> list[tuple[httpx.Response, float]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: timed_post(server, path, b), bodies))


@pytest.fixture
def restore_ingress(client):
    yield
    configure_ingress(client, ingress_config())


def assert_overloaded(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "overloaded"
    assert error["code"] == code


def test_burst_over_tiny_limits_gets_fast_503s(server, client, restore_ingress):
    configure_ingress(client, {"routes": {"chat": {"max_running": 1, "max_queued": 1}}})
    answers = burst(server, CHAT, [chat_body(16, i) for i in range(20)])
    statuses = [r.status_code for r, _ in answers]
    assert set(statuses) <= {200, 503}
    codes = [r.json()["error"]["code"] for r, _ in answers if r.status_code != 200]
    assert statuses.count(200) >= 2, codes  # the one running and the one queued
    assert statuses.count(503) >= 10
    for response, seconds in answers:
        if response.status_code == 200:
            assert response.json()["choices"][0]["message"]["content"]
        else:
            assert_overloaded(response, "queue_full")
            assert seconds < 1.0  # refused at arrival, not after waiting
    route = client.get("/v1/status").json()["routes"]["chat"]
    assert route["running"] == 0 and route["queued"] == 0  # every slot given back
    assert route["rejected"]["queue_full"] >= statuses.count(503)


def test_a_full_route_does_not_slow_another(server, client, restore_ingress):
    configure_ingress(client, {"routes": {"chat": {"max_running": 1, "max_queued": 0}}})

    def embed_latencies(n: int) -> list[float]:
        out = []
        for i in range(n):
            response, seconds = timed_post(server, "/v1/embeddings", {"input": f"isolated {i}"})
            assert response.status_code == 200
            out.append(seconds)
        return out

    alone = statistics.median(embed_latencies(10))
    stop = threading.Event()
    chat_statuses: list[int] = []

    def saturate_chat():
        while not stop.is_set():
            chat_statuses.append(timed_post(server, CHAT, chat_body(48))[0].status_code)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(saturate_chat)
        time.sleep(1.0)
        during = statistics.median(embed_latencies(10))
        stop.set()
    assert 503 in chat_statuses and 200 in chat_statuses  # chat was at its limit throughout
    # Embeddings share the CPU with the decoding chat, but never wait behind chat's queue.
    assert during < max(5 * alone, 0.5)


def test_deadline_gives_504_and_frees_the_slot(server, client, restore_ingress):
    configure_ingress(
        client, {"routes": {"chat": {"max_running": 1, "max_queued": 4, "deadline_s": 1.0}}}
    )
    answers = burst(server, CHAT, [chat_body(64, i) for i in range(3)])
    for response, seconds in answers:
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        assert seconds < 5.0  # cut at the deadline, not after the whole generation
    route = client.get("/v1/status").json()["routes"]["chat"]
    assert route["running"] == 0 and route["queued"] == 0
    assert route["timed_out"] >= 3
    # The slot is free again: a short request is answered (under a deadline it meets on a
    # busy machine too; 2 tokens take 0.5-0.6 s here, close to 1 s).
    configure_ingress(
        client, {"routes": {"chat": {"max_running": 1, "max_queued": 0, "deadline_s": 30.0}}}
    )
    response, _ = timed_post(server, CHAT, chat_body(2))
    assert response.status_code == 200, response.text


def test_streaming_past_its_deadline_ends_with_an_error_event(server, client, restore_ingress):
    configure_ingress(client, {"routes": {"chat": {"deadline_s": 1.0}}})
    with client.stream("POST", CHAT, json={**chat_body(64), "stream": True}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"type":"timeout"' in events[-2]
    assert client.get("/v1/status").json()["routes"]["chat"]["running"] == 0


def test_heavy_routes_shed_under_memory_pressure(server, client, restore_ingress):
    # Any memory use passes a 1% threshold: the heavy routes refuse, the cheap ones serve.
    configure_ingress(client, {"shedding": {"memory_percent": 1.0, "interval_s": 0.1}})
    time.sleep(0.2)
    assert_overloaded(client.post(CHAT, json=chat_body(4)), "resource_pressure")
    rag = {"collection": "anything", "query": "what?"}
    assert_overloaded(client.post("/v1/rag/query", json=rag), "resource_pressure")
    ingest = {"collection": "shed", "documents": [{"text": "A document."}]}
    assert_overloaded(client.post("/v1/documents", json=ingest), "resource_pressure")
    assert client.post("/v1/embeddings", json={"input": "still served"}).status_code == 200
    shedding = client.get("/v1/status").json()["shedding"]
    assert shedding["active"] and shedding["memory_percent"] > 1.0
    # Back to the normal threshold: chat is served again.
    configure_ingress(client, {"shedding": {"interval_s": 0.1}})
    time.sleep(0.2)
    assert client.post(CHAT, json=chat_body(4)).status_code == 200


def test_cpu_stalls_refuse_only_requests_that_would_queue(server, client, restore_ingress):
    # Any CPU stall passes a 0.01% threshold: a chat that finds a free slot still runs (the
    # server has room for it), while those that would queue behind it are refused.
    configure_ingress(
        client,
        {
            "shedding": {"cpu_stall_percent": 0.01, "interval_s": 0.1},
            "routes": {"chat": {"max_running": 1, "max_queued": 8}},
        },
    )
    for _ in range(3):  # a few samples, so the stall share is measured
        client.get("/v1/status")
        time.sleep(0.2)
    assert client.get("/v1/status").json()["shedding"]["cpu_stalled"]
    response, _ = timed_post(server, CHAT, chat_body(2))
    assert response.status_code == 200  # a free slot: never refused for CPU stalls
    answers = burst(server, CHAT, [chat_body(32, i) for i in range(6)])
    statuses = [r.status_code for r, _ in answers]
    assert set(statuses) == {200, 503}, statuses
    for response, seconds in answers:
        if response.status_code == 503:
            assert_overloaded(response, "resource_pressure")
            assert seconds < 1.0
    route = client.get("/v1/status").json()["routes"]["chat"]
    assert route["queued"] == 0 and route["running"] == 0


def test_a_queue_waiting_too_long_refuses_newcomers(server, client, restore_ingress):
    # The oldest queued chat has waited 1.25% of a 120 s deadline (1.5 s) while six run one
    # after the other: a newcomer is refused at once rather than queued. The deadline leaves
    # the six answers room on a slow CPU (about 5 tokens/s for fp32 transformers on 1 thread).
    configure_ingress(
        client,
        {
            "shedding": {"queue_wait_fraction": 0.0125},
            "routes": {"chat": {"max_running": 1, "max_queued": 8, "deadline_s": 120}},
        },
    )
    with ThreadPoolExecutor(6) as pool:
        queued = [pool.submit(timed_post, server, CHAT, chat_body(64, i)) for i in range(6)]
        time.sleep(2.0)
        route = client.get("/v1/status").json()["routes"]["chat"]
        late, seconds = timed_post(server, CHAT, chat_body(4))
        answers = [f.result()[0] for f in queued]
    assert route["queued"] >= 1 and route["oldest_wait_s"] > 1.5, route
    assert_overloaded(late, "queue_wait")
    assert seconds < 1.0
    assert [a.status_code for a in answers] == [200] * 6  # those queued were all served
    assert client.get("/v1/status").json()["routes"]["chat"]["rejected"]["queue_wait"] >= 1


def test_a_flood_of_management_calls_gets_503_and_ingest_still_runs(
    server, client, restore_ingress
):
    configure_ingress(client, {"routes": {"manage": {"max_running": 1, "max_queued": 0}}})

    def listing(_: int) -> int:
        with httpx.Client(base_url=server, timeout=60) as c:
            return c.get("/v1/collections").status_code

    with ThreadPoolExecutor(16) as pool:
        flood = pool.map(listing, range(64))
        ingest = {"collection": "managed", "documents": [{"text": "Ingested during a flood."}]}
        ingested, _ = timed_post(server, "/v1/documents", ingest)
        statuses = list(flood)
    assert ingested.status_code == 200
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    # /ready has no gate of its own: probes answer while management calls are refused.
    assert client.get("/ready").status_code == 200
    route = client.get("/v1/status").json()["routes"]["manage"]
    assert route["rejected"]["queue_full"] >= statuses.count(503)
    assert client.delete("/v1/collections/managed").status_code == 200


def replicas(client, deployment: str) -> int:
    states = client.get("/v1/status").json()["deployments"][deployment]["replicas"]
    return states.get("RUNNING", 0)


def test_embedder_scales_up_under_load_and_back_down(server, client):
    scaling = next(
        d for d in TEST_CONFIG["applications"][0]["deployments"] if d["name"] == "Embedder"
    )
    autoscaling = {**scaling["autoscaling_config"], "max_replicas": 2}
    redeploy([{"name": "Embedder", "autoscaling_config": autoscaling}])
    stop = threading.Event()

    sent = itertools.count()

    def load():  # unique inputs: the embedding cache must not answer the load
        with httpx.Client(base_url=server, timeout=120) as c:
            while not stop.is_set():
                k = next(sent)
                texts = [f"sustained load {k} sentence {i}" for i in range(16)]
                c.post("/v1/embeddings", json={"input": texts})

    def wait_for(replica_count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while replicas(client, "Embedder") != replica_count:
            assert time.monotonic() < deadline, f"the embedder never reached {replica_count}"
            time.sleep(0.5)

    try:
        with ThreadPoolExecutor(12) as pool:
            try:
                for _ in range(12):
                    pool.submit(load)
                wait_for(2, timeout_s=120)
            finally:
                stop.set()
        wait_for(1, timeout_s=120)
    finally:
        redeploy()


def test_status_summarizes_routes_deployments_and_models(client):
    status = client.get("/v1/status").json()
    routes = {"embeddings", "rerank", "chat", "search", "rag", "ingest", "classify", "manage"}
    assert set(status["routes"]) == routes
    chat = status["routes"]["chat"]
    assert chat["max_running"] == 8 and chat["max_queued"] == 32 and chat["shed"]
    assert {"running", "queued", "admitted", "rejected", "timed_out"} <= set(chat)
    assert status["deployments"]["Embedder"]["replicas"]["RUNNING"] >= 1
    deployments = {"Ingress", "Search", "Rag", "Documents", "Classify", "Generator"}
    assert deployments | {"RagGenerator"} <= set(status["deployments"])
    assert status["models"]["generator"]["precision"] == "fp32"
    # RAG answers on a Generator of their own (rag.generator: own), chosen for RAG's answers.
    assert status["models"]["generator"]["engine_answers"] == ["chat", "busy"]
    assert status["models"]["rag_generator"]["engine_answers"] == ["rag", "rag_first_token"]
    shedding = status["shedding"]
    assert 0 < shedding["memory_percent"] < 100
    assert shedding["cpu_stall_percent"] is None or 0 <= shedding["cpu_stall_percent"] <= 100


def test_custom_metrics_reach_prometheus(client):
    """Ray's metrics endpoint serves the route counters and the batch-size histogram."""
    import ray

    assert client.post("/v1/embeddings", json={"input": "counted"}).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = (
        "ray_rag_route_admitted_total{",
        "ray_rag_route_running{",
        "ray_rag_batch_size_bucket{",
    )
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        assert time.monotonic() < deadline, [n for n in wanted if n not in text]
        time.sleep(2)
    admitted = [line for line in text.splitlines() if line.startswith("ray_rag_route_admitted")]
    assert any('route="embeddings"' in line for line in admitted)
