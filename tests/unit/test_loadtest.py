"""scripts/loadtest.py: the CLI bounds, the summary, and a short run against a fake server."""

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Response

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))  # as when run as a file: `benchkit` beside it
spec = importlib.util.spec_from_file_location("loadtest", ROOT / "scripts" / "loadtest.py")
loadtest = importlib.util.module_from_spec(spec)
sys.modules["loadtest"] = loadtest  # dataclasses resolve their module by name
spec.loader.exec_module(loadtest)
from benchkit import loadgen, routeload  # noqa: E402

STATUS = {
    "routes": {"embeddings": {"max_running": 4, "max_queued": 8, "running": 2, "queued": 1}},
    "shedding": {"cpu_percent": 45.0, "memory_percent": 30.1, "active": False},
    "deployments": {
        "Embedder": {"status": "HEALTHY", "replicas": {"RUNNING": 2}},
        "Generator": {"status": "UPDATING", "replicas": {"STARTING": 1}},
    },
    "models": {},
}


def test_remote_targets_are_refused():
    remote = ["--route", "chat", "--steps", "1", "--duration", "1", "--url", "http://example.com"]
    with pytest.raises(SystemExit):
        loadtest.parse_args(remote)


def test_cli_bounds():
    cfg = loadtest.parse_args(["--route", "chat", "--steps", "1,5,50", "--duration", "60"])
    assert (cfg.steps, cfg.duration, cfg.name, cfg.url) == (
        [1, 5, 50],
        60.0,
        "chat",
        "http://127.0.0.1:8000",
    )
    for extra in (
        ["--steps", "1,513", "--duration", "1"],
        ["--steps", "1", "--duration", "601"],
        ["--steps", "1"],  # --duration is required outside smoke runs
    ):
        with pytest.raises(SystemExit):
            loadtest.parse_args(["--route", "chat", *extra])
    smoke = loadtest.parse_args(["--route", "chat", "--smoke"])
    assert (smoke.steps, smoke.duration) == ([2], 3.0)
    assert smoke.out != ROOT / "docs" / "benchmarks"  # a smoke run leaves the figures alone


def test_summarize_counts_and_percentiles():
    Record = loadgen.Record
    ok = [Record(t=i, latency=(i + 1) / 10, status="200", concurrency=4) for i in range(10)]
    shed = [
        Record(t=1, latency=0.01, status="503", concurrency=4, retry_after=True),
        Record(t=2, latency=0.03, status="503", concurrency=4, retry_after=False),
    ]
    failed = [Record(t=3, latency=300.0, status="error", concurrency=4)]
    samples = [{"t": 0, "memory_percent": 31.5}, {"t": 1, "memory_percent": None}]
    summary = routeload.summarize(ok + shed + failed, duration=2.0, samples=samples)
    assert summary["requests"] == 13
    assert summary["answers"] == 12
    assert summary["throughput_rps"] == 6.0
    assert summary["ok_rps"] == 5.0
    assert summary["status"] == {"200": 10, "503": 2, "error": 1}
    assert summary["latency_ms"]["200"] == {"p50": 550.0, "p95": 955.0, "p99": 991.0}
    assert summary["latency_ms"]["503"]["p50"] == 20.0
    assert summary["latency_ms"]["all"]["p99"] < 1000.0  # the client-side error is no answer
    assert summary["missing_retry_after_503"] == 1
    assert summary["max_memory_percent"] == 31.5

    empty = routeload.summarize(ok, duration=1.0)
    assert empty["latency_ms"]["503"] == {"p50": None, "p95": None, "p99": None}
    assert empty["max_memory_percent"] is None


def test_parse_status_and_bodies():
    parsed = routeload.parse_status(STATUS, "embeddings")
    assert parsed == {
        "replicas": {"Embedder": 2, "Generator": 0},
        "memory_percent": 30.1,
        "cpu_percent": 45.0,
        "running": 2.0,
        "queued": 1.0,
    }
    assert routeload.parse_status({}, "chat")["replicas"] == {}

    sentences = [f"sentence number {i} has quite a few words in it." for i in range(20)]
    rerank = next(routeload.bodies("rerank", sentences))
    assert rerank["query"] == sentences[0] and len(rerank["documents"]) == 8
    # Past the last sentence each comes back numbered, so no cache can answer; --repeat cycles.
    unique = [b["input"] for b in islice(routeload.bodies("embeddings", sentences), 45)]
    assert len(set(unique)) == 45 and unique[20] == sentences[0] + " [2]"
    cycled = [
        b["input"] for b in islice(routeload.bodies("embeddings", sentences, repeat=True), 45)
    ]
    assert len(set(cycled)) == 20
    ingest = routeload.bodies("ingest", sentences, collection="c")
    first, second = next(ingest), next(ingest)
    assert [first["documents"][0]["id"], second["documents"][0]["id"]] == [
        "loadtest-0",
        "loadtest-1",
    ]
    chat = next(routeload.bodies("chat", sentences, max_tokens=7))
    assert chat["max_tokens"] == 7 and chat["temperature"] == 0
    seed = routeload.seed_batches(sentences, "c")
    assert sum(len(b["documents"]) for b in seed) == 50


ingested: list[int] = []
searched: list[dict] = []


def fake_service() -> FastAPI:
    app = FastAPI()
    calls = {"n": 0}
    ingested.clear()
    searched.clear()

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        calls["n"] += 1
        n = calls["n"]
        await asyncio.sleep(0.005)
        if n % 3 == 0:
            return Response(status_code=503, headers={"Retry-After": "1"})
        return Response('{"data": []}', media_type="application/json")

    @app.post("/v1/documents")
    async def documents(body: dict) -> Response:
        ingested.append(len(body["documents"]))
        if len(ingested) == 1:  # the first batch is shed once and retried
            return Response(status_code=503, headers={"Retry-After": "0"})
        return Response('{"ingested": 1}', media_type="application/json")

    @app.post("/v1/search")
    async def search(body: dict) -> dict:
        searched.append(body)
        return {"results": []}

    @app.get("/v1/status")
    async def status() -> dict:
        return STATUS

    return app


@pytest.fixture
def server_url():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(fake_service(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_run_against_fake_server(server_url, tmp_path):
    cfg = routeload.LoadConfig(
        url=server_url,
        route="embeddings",
        steps=[4],
        duration=1.0,
        out=tmp_path,
        name="fake",
        poll=0.2,
        timeout=5.0,
        wait_retry_after=False,
        command="loadtest test",
    )
    loadtest.execute(cfg, sentences=["one two three four five six seven eight."])

    report = json.loads((tmp_path / "loadtest-fake.json").read_text())
    assert (tmp_path / "loadtest-fake.png").read_bytes().startswith(b"\x89PNG")
    assert "p95 ms" in (tmp_path / "loadtest-fake.md").read_text()
    assert {"command", "url", "route", "steps", "duration", "host", "results", "overall"} <= set(
        report
    )
    overall = report["overall"]
    (step,) = report["results"]
    assert step["concurrency"] == 4
    assert overall["requests"] == step["requests"] == sum(overall["status"].values()) > 10
    assert set(overall["status"]) == {"200", "503"}
    # The fake service refuses every third request it receives.
    assert abs(overall["status"]["503"] - overall["requests"] / 3) <= 0.05 * overall["requests"]
    assert overall["missing_retry_after_503"] == 0
    assert overall["latency_ms"]["200"]["p50"] is not None
    assert overall["max_memory_percent"] == 30.1
    assert report["replicas"] and report["replicas"][0]["replicas"]["Embedder"] == 2
    assert report["resources"][0]["queued"] == 1.0


def test_search_seeds_the_collection_first(server_url, tmp_path):
    cfg = routeload.LoadConfig(
        url=server_url,
        route="search",
        steps=[2],
        duration=0.3,
        out=tmp_path,
        name="seeded",
        collection="seeded",
        poll=0.2,
        timeout=5.0,
    )
    report = loadtest.execute(cfg)
    assert ingested == [10, 10, 10, 10, 10, 10]  # five batches of ten, the first sent twice
    assert searched and searched[0]["collection"] == "seeded" and searched[0]["top_k"] == 5
    assert report["overall"]["status"] == {"200": len(searched)}


def test_zipf_mix_draws_popular_queries_more_often():
    ranks = list(islice(routeload.zipf_ranks(1.0, 50, seed=1), 20_000))
    counts = [ranks.count(r) for r in range(50)]
    assert min(ranks) == 0 and max(ranks) < 50
    # 1/rank: rank 1 about twice rank 2 and ten times rank 10 (sampling noise allowed).
    assert 1.7 < counts[0] / counts[1] < 2.3 and 7 < counts[0] / counts[9] < 13
    assert list(islice(routeload.zipf_ranks(1.0, 50, seed=1), 100)) == ranks[:100]
    sentences = [f"s{i}" for i in range(50)]
    mixed = routeload.bodies("search", sentences, ranks=iter([3, 3, 0]))
    assert [next(mixed)["query"] for _ in range(3)] == ["s3", "s3", "s0"]
    with pytest.raises(ValueError):
        next(routeload.zipf_ranks(0, 10))


def test_cache_summary_counts_hits_by_source():
    Record = loadgen.Record
    records = [
        Record(0, 0.005, "200", 1, detail="precomputed"),
        Record(0, 0.007, "200", 1, detail="precomputed"),
        Record(0, 0.020, "200", 1, detail="response"),
        Record(0, 1.500, "200", 1),
        Record(0, 0.001, "503", 1),
    ]
    summary = routeload.cache_summary(records)
    assert summary["hit_rate"] == 0.75
    assert summary["by_source"]["precomputed"]["count"] == 2
    assert summary["by_source"]["none"]["latency_ms"]["p50"] == 1500.0


def fake_prometheus() -> FastAPI:
    """Answers as Prometheus's HTTP API does: ready, an instant `up` timestamp in the future
    (scraped after the load), and one range series per query."""
    app = FastAPI()
    asked: list[str] = []
    app.state.asked = asked

    @app.get("/-/ready")
    async def ready() -> Response:
        return Response("Prometheus Server is Ready.")

    @app.get("/api/v1/query")
    async def instant(query: str) -> dict:
        return {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [{"metric": {}, "value": [time.time(), str(time.time() + 60)]}],
            },
        }

    @app.get("/api/v1/query_range")
    async def range_(query: str, start: float, end: float, step: float) -> dict:
        asked.append(query)
        metric = {"deployment": "Embedder"} if "replica_healthy" in query else {}
        values = [[start, "12.5"], [start + step, "NaN"], [end, "15"]]
        if "replica_healthy" in query:
            values = [[start, "1"], [end, "2"]]
        return {
            "status": "success",
            "data": {"resultType": "matrix", "result": [{"metric": metric, "values": values}]},
        }

    return app


@pytest.fixture
def prometheus_url():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = fake_prometheus()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake Prometheus did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.asked
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_server_series_from_prometheus_go_into_the_report(server_url, prometheus_url, tmp_path):
    url, asked = prometheus_url
    cfg = routeload.LoadConfig(
        url=server_url,
        route="embeddings",
        steps=[2],
        duration=0.5,
        out=tmp_path,
        name="prom",
        poll=0.2,
        timeout=5.0,
        wait_retry_after=False,
        command="loadtest test",
    )
    report = loadtest.execute(cfg, sentences=["one two three four five six."], prometheus=url)
    server = report["server"]
    assert server["prometheus"] == url
    series = server["series"]
    # The Ingress's latency of the route's path (the one series that carries the path on the
    # fast path too), the route's queue wait, replicas by deployment.
    assert 'deployment="Ingress",route="/v1/embeddings"' in server["queries"]["latency_p99_ms"]
    assert 'route="embeddings"' in server["queries"]["queue_wait_p99_ms"]
    assert set(asked) == set(server["queries"].values())
    (points,) = series["latency_p50_ms"].values()
    assert [v for _, v in points] == [12.5, 15.0]  # NaN (no requests in the window) dropped
    assert points[0][0] == pytest.approx(0.0)  # seconds since the run's start
    assert series["replicas"] == {"Embedder": [(0.0, 1.0), (points[-1][0], 2.0)]}
    saved = json.loads((tmp_path / "loadtest-prom.json").read_text())
    assert saved["server"]["series"]["replicas"]["Embedder"][1][1] == 2.0
    assert (tmp_path / "loadtest-prom.png").read_bytes().startswith(b"\x89PNG")


def test_without_prometheus_the_report_is_as_before(server_url, tmp_path):
    cfg = routeload.LoadConfig(
        url=server_url,
        route="embeddings",
        steps=[1],
        duration=0.3,
        out=tmp_path,
        name="none",
        poll=0.2,
        timeout=5.0,
        command="loadtest test",
    )
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
    report = loadtest.execute(cfg, sentences=["one two three four."], prometheus=nobody)
    closed.close()
    assert "server" not in report
    assert loadtest.parse(["--route", "chat", "--smoke", "--prometheus", "off"])[1] is None
    with pytest.raises(SystemExit):
        loadtest.parse(["--route", "chat", "--smoke", "--prometheus", "http://example.com:9090"])
