"""Fixtures shared by the unit and integration tests."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
