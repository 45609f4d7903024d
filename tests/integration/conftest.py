"""One Ray cluster and one Serve app, with the real bundled models, for the whole session."""

import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEST_CONFIG = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
PORT = TEST_CONFIG["http_options"]["port"]
BASE_URL = f"http://127.0.0.1:{PORT}"


def deploy(deployments: list[dict] | None = None) -> None:
    """Deploy configs/test.yaml, with per-deployment overrides, as `serve run`/`deploy` do."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    app = TEST_CONFIG["applications"][0]
    merged = {d["name"]: d for d in app.get("deployments", [])}
    for override in deployments or []:
        merged[override["name"]] = {**merged.get(override["name"], {}), **override}
    config = {**TEST_CONFIG, "applications": [{**app, "deployments": list(merged.values())}]}
    schema = ServeDeploySchema.model_validate(config)
    serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    serve_start().deploy_apps(schema)


@pytest.fixture(scope="session")
def server():
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    deploy()
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=BASE_URL, timeout=10) as client:
        while True:
            try:
                if client.get("/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not become ready within 300 s")
            time.sleep(0.5)
    yield BASE_URL
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
