"""A real Prometheus scrapes the test cluster; every query of the Grafana dashboard returns data,
and scripts/loadtest.py reads the server's series of its load from it.

A renamed or missing metric fails here instead of leaving a dashboard panel or a load test's
server-side figures empty.
"""

import importlib.util
import json
import math
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import configure_ingress, ingress_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "configs" / "monitoring" / "grafana" / "dashboards" / "rag-serve.json"


def script(name: str):
    """scripts/NAME.py as a module, as when run as a file (`benchkit` beside it)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


monitor = script("monitor")
loadtest = script("loadtest")

CHAT = "/v1/chat/completions"
# What Grafana puts in for $__rate_interval: wide enough to hold several of Ray's reports.
RATE_INTERVAL = "1m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    return [
        (p["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for p in panels
        for t in p.get("targets", [])
    ]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus on 127.0.0.1, scraping every alive node of the test cluster every 2 s.

    The test cluster runs without Ray's dashboard, which is what writes the service-discovery
    file `make monitor` reads, so the file is written here from the same source, `ray.nodes()`.
    """
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    import ray

    state = tmp_path_factory.mktemp("prometheus")
    targets = [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]
    ]
    discovery = state / monitor.DISCOVERY_FILE
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    port = free_port()
    process = monitor.start_prometheus(discovery, state, port, scrape_interval_s=2)
    yield f"http://127.0.0.1:{port}", ray.nodes()[0]["NodeManagerAddress"]
    process.terminate()
    process.wait(timeout=30)


def query(prometheus_url: str, promql: str) -> list[dict]:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    assert answer.status_code == 200, (promql, answer.text)
    return answer.json()["data"]["result"]


def post(server: str, path: str, body: dict) -> int:
    with httpx.Client(base_url=server, timeout=120) as c:
        return c.post(path, json=body).status_code


def chat(tokens: int, i: int) -> dict:
    content = f"Tell a long story about a lighthouse keeper. ({i})"
    return {"messages": [{"role": "user", "content": content}], "max_tokens": tokens}


COLLECTION = "monitored"
DOCUMENTS = [
    {
        "id": "keeper",
        "text": "The lighthouse keeper climbs the stairs each night to light the lamp.",
    },
    {"id": "baker", "text": "The baker rises before dawn to bake bread for the village."},
    {"id": "sea", "text": "Storms on the sea wreck ships that miss the lighthouse's beam."},
]


def send_load(server: str, client: httpx.Client) -> None:
    """Every kind of event a panel charts: admitted, rejected and timed-out requests, model
    batches, cache hits and misses, search and RAG stages, first and later tokens."""
    for i in range(6):  # the same text twice: a miss, then a hit
        for text in (f"monitored {i}", f"monitored {i}"):
            assert client.post("/v1/embeddings", json={"input": text}).status_code == 200
    rerank = {"query": "lighthouse", "documents": ["a lighthouse keeper", "a baker", "the sea"]}
    assert client.post("/v1/rerank", json=rerank).status_code == 200
    # Retrieval stages (embed, search, rerank) and a RAG answer's generation.
    documents = {"collection": COLLECTION, "documents": DOCUMENTS}
    assert client.post("/v1/documents", json=documents).status_code == 200
    for i in range(3):  # a new query each time: the response cache would skip the stages
        search = {"collection": COLLECTION, "query": f"who lights the lamp ({i})", "rerank": True}
        assert client.post("/v1/search", json=search).status_code == 200
    rag = {"collection": COLLECTION, "query": f"What does the keeper do? ({time.time()})"}
    assert client.post("/v1/rag/query", json={**rag, "max_tokens": 4}).status_code == 200
    # One slot, no queue, a one-second deadline: a burst gets 503s (queue_full), long
    # generations get 504s, short ones answer 200 and record their time to first token.
    configure_ingress(
        client, {"routes": {"chat": {"max_running": 1, "max_queued": 0, "deadline_s": 1.0}}}
    )
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: post(server, CHAT, chat(64, i)), range(6)))
    assert 503 in statuses and 504 in statuses, statuses
    # A deadline short answers meet on a busy machine too (3 tokens take ~0.5 s here).
    configure_ingress(
        client, {"routes": {"chat": {"max_running": 1, "max_queued": 0, "deadline_s": 30.0}}}
    )
    for i in range(3):  # first tokens and, after them, the time per output token
        assert post(server, CHAT, chat(3, i)) == 200


def charted(result: list[dict], promql: str) -> bool:
    """Data, and for a rate (events per second, quantiles and shares of them) a positive
    finite value: the load is on the chart, not only the series. Levels (gauges) may be 0."""
    values = [float(r["value"][1]) for r in result]
    if "rate(" not in promql:
        return bool(values)
    return any(math.isfinite(v) and v > 0 for v in values)


def wait_until_charted(
    url: str, queries: list[tuple[str, str]], timeout_s: float, again=None, every_s: float = 20
) -> list:
    """The queries not yet charted when every one is, or at the deadline. While some are not,
    `again()` (the load once more) runs every `every_s`: a series whose first sample already
    holds all its events (a replica that reported it late, or a restarted one) shows a rate
    only once a later scrape sees it grow."""
    start = last = time.monotonic()
    while True:
        queries = [q for q in queries if not charted(query(url, q[1]), q[1])]
        now = time.monotonic()
        if not queries or now > start + timeout_s:
            return queries
        if again is not None and now - last > every_s:
            again()
            last = time.monotonic()
        time.sleep(3)


@pytest.fixture(scope="module")
def loaded(server, prometheus):
    """The load twice: Ray exports a counter from its first increment, so a rate over the first
    round can be 0; the second round's events are what the rates must show."""
    url, _ = prometheus
    with httpx.Client(base_url=server, timeout=120) as client:
        try:  # the route limits go back even when the load fails
            send_load(server, client)
            wait_until_charted(url, [(t, f"count({q})") for t, q in dashboard_queries()], 90)
            send_load(server, client)
            yield prometheus, lambda: send_load(server, client)
        finally:
            configure_ingress(client, ingress_config())
            client.delete(f"/v1/collections/{COLLECTION}")


def test_prometheus_listens_on_loopback_only(prometheus):
    url, node_address = prometheus
    assert httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    if node_address.startswith("127."):
        pytest.skip("the node has no address beyond loopback to try")
    port = url.rsplit(":", 1)[1]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{node_address}:{port}/-/ready", timeout=5)


def test_every_node_is_scraped(prometheus):
    url, _ = prometheus
    deadline = time.monotonic() + 30
    while not (up := query(url, 'up{job="ray"}')) or any(r["value"][1] != "1" for r in up):
        assert time.monotonic() < deadline, up
        time.sleep(1)


def test_every_dashboard_query_returns_data(loaded):
    (url, _), again = loaded
    # Ray reports a worker's metrics every few seconds and a rate needs two scrapes of them.
    empty = wait_until_charted(url, dashboard_queries(), 150, again)
    names = query(url, 'count by (__name__) ({__name__=~"ray_(rag|serve)_.*"})')
    exported = sorted(r["metric"]["__name__"] for r in names)
    assert not empty, {"not charted": empty, "exported": exported}
    # The check can fail: the name as recorded, without Ray's prefix and suffix, has no data.
    assert not query(url, "rag_route_admitted") and not query(url, "ray_rag_route_admitted")


def test_loadtest_plots_what_the_server_saw(prometheus, server, tmp_path):
    """scripts/loadtest.py against the test cluster with this Prometheus: Serve's latency of the
    route's path and the healthy replicas over the load's window come back from
    /api/v1/query_range into the report and its PNG. A renamed metric or route label, or a
    query Prometheus refuses, fails here."""
    url, _ = prometheus
    cfg = loadtest.LoadConfig(
        url=server,
        route="embeddings",
        steps=[2],
        duration=20.0,  # beyond Ray's metrics report interval: the window holds the load
        out=tmp_path,
        name="prometheus",
        poll=0.5,
        timeout=60.0,
        ramp=0.5,
        command="test_monitoring",
    )
    report = loadtest.execute(cfg, sentences=["The keeper lights the lamp."], prometheus=url)
    assert report["overall"]["status"].get("200", 0) > 10, report["overall"]["status"]
    series = report["server"]["series"]
    latencies = [v for points in series["latency_p99_ms"].values() for _, v in points]
    assert latencies and all(0 < v < 60_000 for v in latencies), series["latency_p99_ms"]
    # Points are seconds since the load's start, within its window.
    times = [t for points in series["latency_p99_ms"].values() for t, _ in points]
    assert min(times) >= 0 and max(times) <= report["duration"] * len(report["steps"]) + 30
    replicas = series["replicas"]
    assert {"Ingress", "Embedder"} <= set(replicas), replicas
    assert all(v >= 1 for _, v in replicas["Embedder"])
    saved = json.loads((tmp_path / "loadtest-prometheus.json").read_text())
    assert saved["server"]["series"]["replicas"]["Embedder"]
    assert (tmp_path / "loadtest-prometheus.png").read_bytes().startswith(b"\x89PNG")
