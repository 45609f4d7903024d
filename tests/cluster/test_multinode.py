"""The same graph on a two-node Ray cluster (`ray.cluster_utils.Cluster` on this machine): replicas
on both nodes share one external PostgreSQL and one Redis; when the worker node goes, HTTP keeps
answering and its replicas come back on the head.

Runs in its own pytest process (`make test` does so): it needs a cluster of its own, and only
one Ray cluster runs at a time here.
"""

import os
import threading
import time
from collections import Counter

import httpx
import psycopg
import pytest
import ray
import redis
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serve_app.cluster import NODE_ID_CHARS
from serve_app.launch import deploy, wait_ready
from tests.integration.conftest import TEST_CONFIG
from tests.postgres import external_postgres

pytestmark = pytest.mark.integration

PORT = 18100
REDIS_URL = os.environ.get("TEST_REDIS_URL")


def replica_nodes() -> dict[str, set[str]]:
    """Node ids hosting the live replicas of each deployment."""
    nodes: dict[str, set[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")]):
        if actor.class_name.startswith("ServeReplica:rag:"):
            nodes.setdefault(actor.class_name.rsplit(":", 1)[1], set()).add(actor.node_id)
    return nodes


@pytest.fixture(scope="module")
def cluster():
    if not REDIS_URL:
        pytest.skip("needs a Redis (TEST_REDIS_URL): .ci/run starts one")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": True},
    )
    worker = cluster.add_node(num_cpus=2, resources={"worker": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    with external_postgres() as database_url:
        yield cluster, worker, database_url
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def app_config(database_url: str) -> dict:
    app = TEST_CONFIG["applications"][0]
    args = {
        **app["args"],
        "store": {"database_url": database_url},
        "cache": {"redis_url": REDIS_URL},
    }
    embedder = {
        "name": "Embedder",
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
        "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02},
    }
    search = {"name": "Search", "autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}
    # The one Ingress replica stays on the head, beside the one proxy: the HTTP requests an
    # ingress replica is handling when its node dies get 500 from Serve's proxy, which does not
    # retry (docs/reliability.md). What this test loses is the replicas behind the ingress.
    ingress = {
        **next(d for d in app["deployments"] if d["name"] == "Ingress"),
        "ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 0.01}},
    }
    replaced = {"Embedder", "Search", "Ingress"}
    deployments = [d for d in app["deployments"] if d["name"] not in replaced]
    deployments += [embedder, search, ingress]
    return {
        **TEST_CONFIG,
        "proxy_location": "HeadOnly",  # one machine: a proxy per node would share one port
        "http_options": {"host": "127.0.0.1", "port": PORT},
        "applications": [{**app, "args": args, "deployments": deployments}],
    }


def test_replicas_on_both_nodes_share_the_store_and_cache_and_survive_losing_a_node(cluster):
    cluster_, worker, database_url = cluster
    base_url = deploy(app_config(database_url))
    wait_ready(base_url, timeout_s=600)
    head_id, worker_id = cluster_.head_node.node_id, worker.node_id

    placed = replica_nodes()
    print(f"\nhead {head_id[:12]}, worker {worker_id[:12]}; replicas by node: {placed}")
    assert set().union(*placed.values()) == {head_id, worker_id}  # SPREAD over both nodes
    assert placed["Embedder"] == placed["Search"] == {head_id, worker_id}

    client = httpx.Client(base_url=base_url, timeout=120)
    docs = [{"id": f"d{i}", "text": f"Node test document {i} about harbours."} for i in range(6)]
    client.post("/v1/documents", json={"collection": "nodes", "documents": docs}).raise_for_status()
    for i in range(40):  # enough distinct texts that both embedder replicas take some
        client.post("/v1/embeddings", json={"input": [f"shared cache {i}"]}).raise_for_status()
    # Every process connects under a name saying where it runs (role@node id).
    with psycopg.connect(database_url) as conn:
        names = {r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity")}
    store_nodes = {n.split("@")[1] for n in names if n.startswith("rag-serve:")}
    cache = redis.Redis.from_url(REDIS_URL)
    cache_nodes = {
        c["name"].split("@")[1]
        for c in cache.client_list()
        if c.get("name", "").startswith("rag-serve:embedding@")
    }
    short = {head_id[:NODE_ID_CHARS], worker_id[:NODE_ID_CHARS]}
    assert store_nodes == short, store_nodes  # route replicas on both nodes, one database
    assert cache_nodes == short, cache_nodes  # both embedders use one Redis

    # Lose the worker node under load.
    answers: Counter = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/embeddings", json={"input": [f"during removal {i}"]})
                answers[r.status_code] += 1
                if r.status_code != 200:
                    failures.append(r.text[:300])
                i += 1

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(2)
    cluster_.remove_node(worker)
    deadline = time.monotonic() + 300
    while True:
        # While the node goes, a status call can fail (Serve's own status is reconciling, or
        # the ingress replica answering it is on the lost node): ask again until it recovers.
        answer = client.get("/v1/status")
        status = answer.json().get("deployments", {}) if answer.status_code == 200 else {}
        placed = replica_nodes()
        if (
            status
            and all(d["status"] == "HEALTHY" for d in status.values())
            and placed.get("Embedder") == {head_id}
            and len(status["Embedder"]["replicas"]) == 1
        ):
            break
        assert time.monotonic() < deadline, (status, placed)
        time.sleep(1)
    time.sleep(2)
    stop.set()
    thread.join(timeout=200)
    print(f"embeddings while the worker went: {dict(answers)}; after: {replica_nodes()}")
    assert set(answers) == {200}, (answers, failures)  # retried past the lost replicas
    assert set().union(*replica_nodes().values()) == {head_id}
    assert status["Embedder"]["replicas"] == {"RUNNING": 2}
    hits = client.post("/v1/search", json={"collection": "nodes", "query": "harbours"})
    assert hits.status_code == 200 and len(hits.json()["results"]) == 6
