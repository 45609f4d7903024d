"""One Ray cluster and one Serve app, with the real bundled models, for the whole session."""

import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from serve_app.launch import deploy, fast_path_env, load_config, wait_ready
from serve_app.store.embedded import stop_embedded

TEST_CONFIG = load_config(Path(__file__).resolve().parents[2] / "configs" / "test.yaml")
# The session's embedded PostgreSQL lives in a fresh folder, set before the app is deployed.
DATA_DIR = Path(tempfile.mkdtemp(prefix="rag-serve-test-")) / "pgdata"


def test_config() -> dict:
    app = TEST_CONFIG["applications"][0]
    args = {**app["args"], "store": {**app["args"].get("store", {}), "data_dir": str(DATA_DIR)}}
    return {**TEST_CONFIG, "applications": [{**app, "args": args}]}


def redeploy(overrides: list[dict] | None = None) -> None:
    """configs/test.yaml again, with `deployments[]` overrides merged in by name."""
    deploy(test_config(), overrides)


@pytest.fixture(scope="session")
def server():
    import ray
    from ray import serve

    # The fast path `make run` takes (configs/fastpath.env), unless the environment says.
    for name, value in fast_path_env().items():
        os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base_url = deploy(test_config())
    wait_ready(base_url)
    yield base_url
    serve.shutdown()
    ray.shutdown()
    stop_embedded(DATA_DIR)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def configure_ingress(client: httpx.Client, user_config: dict, key: str | None = None) -> None:
    """Redeploy with `user_config` laid over the test config's Ingress settings, section by
    section and route by route, and wait until it is in effect (asking with API `key`, where
    the new settings require one)."""
    base = ingress_config()
    user_config = {
        **base,
        **user_config,
        "shedding": {**base.get("shedding", {}), **user_config.get("shedding", {})},
        "routes": {
            name: {
                **base.get("routes", {}).get(name, {}),
                **user_config.get("routes", {}).get(name, {}),
            }
            for name in {*base.get("routes", {}), *user_config.get("routes", {})}
        },
    }
    redeploy([{"name": "Ingress", "user_config": user_config}])
    from serve_app.config import IngressLive, RouteLimits, overlay
    from serve_app.http.guard import APIKeys

    expected = overlay(IngressLive(), user_config)
    admission = expected.admission
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 60
    while True:
        answer = client.get("/v1/status", headers=headers)
        status = answer.json() if answer.status_code == 200 else None
        routes = status and {
            name: {k: r[k] for k in RouteLimits.model_fields}
            for name, r in status["routes"].items()
        }
        if (
            status
            and routes == {n: limits.model_dump() for n, limits in admission.routes.items()}
            and status["shedding"]["limits"] == admission.shedding.model_dump()
            and status["inputs"] == expected.inputs.model_dump()
            and status["auth"]["keys"] == len(APIKeys.load(expected.auth).digests)
        ):
            return
        assert time.monotonic() < deadline, "the new ingress user_config never arrived"
        time.sleep(0.3)


def ingress_config() -> dict:
    """The Ingress's user_config in configs/test.yaml."""
    app = TEST_CONFIG["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"]
