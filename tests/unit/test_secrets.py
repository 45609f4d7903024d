"""Passwords in DATABASE_URL / REDIS_URL stay out of reprs, errors and logs."""

import asyncio
import logging

import pytest

from serve_app.config import AppConfig, StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.store import open_store

PASSWORD = "hunter2-not-logged"
URL = f"postgresql://app:{PASSWORD}@127.0.0.1:1/rag"  # nothing listens on port 1


def test_urls_with_passwords_are_not_in_the_config_repr(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("REDIS_URL", f"redis://:{PASSWORD}@127.0.0.1:6390/0")
    config = AppConfig()
    assert config.store.database_url == URL  # in effect...
    assert PASSWORD not in repr(config) and PASSWORD not in str(config)  # ...never shown
    assert PASSWORD not in repr(config.store) and PASSWORD not in repr(config.cache)


def test_an_unreachable_database_is_a_503_that_names_no_secret(caplog):
    caplog.set_level(logging.DEBUG)

    async def attempt():
        store = await open_store(StoreConfig(database_url=URL, timeout_s=1.0))
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await store.collection("docs")
            return caught.value
        finally:
            await store.close()

    error = asyncio.run(attempt())
    assert error.status == 503 and PASSWORD not in str(error)
    assert caplog.records, "the outage is logged"
    assert PASSWORD not in caplog.text
