"""Fixtures shared by the unit and integration tests."""

import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import serve

# Tests that load a script by its path (scripts/fuzz.py) need its benchmark library, as when
# the script runs as a file with scripts/ first on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from tests.unit.test_cache import REDIS_SERVER, RedisServer, wait_for


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: TEST_REDIS_URL (.ci/run starts one), else a private redis-server."""
    if url := os.environ.get("TEST_REDIS_URL"):
        wait_for(url)
        yield url
        return
    if not REDIS_SERVER:
        pytest.skip("no redis-server and no TEST_REDIS_URL")
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def replica_loop(max_ongoing_requests: int) -> Iterator[Callable]:
    """`run_until_complete` of one event loop for a whole module, as in a replica:
    `@serve.batch` keeps its queue bound to the loop that first used it, and asks the replica
    context for max_ongoing_requests (outside Serve, the one given here)."""
    deployment = SimpleNamespace(max_ongoing_requests=max_ongoing_requests)
    context = SimpleNamespace(_deployment_config=deployment)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve, "get_replica_context", lambda: context)
        loop = asyncio.new_event_loop()
        try:
            yield loop.run_until_complete
        finally:
            loop.close()
