"""One Ray cluster and one Serve app, with the real bundled models, for the whole session."""

from pathlib import Path

import httpx
import pytest

from serve_app.launch import deploy, load_config, wait_ready

TEST_CONFIG = load_config(Path(__file__).resolve().parents[2] / "configs" / "test.yaml")


def redeploy(overrides: list[dict] | None = None) -> None:
    """configs/test.yaml again, with `deployments[]` overrides merged in by name."""
    deploy(TEST_CONFIG, overrides)


@pytest.fixture(scope="session")
def server():
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base_url = deploy(TEST_CONFIG)
    wait_ready(base_url)
    yield base_url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
