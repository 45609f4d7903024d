"""The vector store against real PostgreSQL + pgvector, in process (no Ray)."""

import asyncio
import os
import signal
import time

import numpy as np
import psutil
import psycopg
import pytest

from serve_app.config import StoreConfig
from serve_app.store import open_store
from serve_app.store.embedded import embedded_url, stop_embedded
from serve_app.store.schema import MIGRATIONS, migrate
from serve_app.store.vector_store import (
    CollectionNotFound,
    DocumentChunks,
    InvalidData,
    ModelMismatch,
    StoreUnavailable,
)
from tests.postgres import external_postgres

pytestmark = pytest.mark.integration


def run(coro):
    return asyncio.run(coro)


def unit(rows: list[list[float]]) -> np.ndarray:
    v = np.array(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("embedded") / "pgdata"
    yield StoreConfig(data_dir=data_dir)
    stop_embedded(data_dir)


@pytest.fixture(scope="module")
def external():
    """A second PostgreSQL, on TCP, reached only through a DATABASE_URL."""
    with external_postgres() as url:
        yield StoreConfig(database_url=url)


async def exercise(config: StoreConfig) -> None:
    store = await open_store(config)
    try:
        docs = await store.ensure_collection("docs", "model-a", 3)
        assert (await store.ensure_collection("docs", "model-a", 3)).id == docs.id
        with pytest.raises(ModelMismatch):
            await store.ensure_collection("docs", "model-b", 3)
        v = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
        await store.replace_documents(
            docs,
            [
                DocumentChunks("a", {"lang": "en", "year": 2020}, ["alpha", "beta"], v[:2]),
                DocumentChunks("b", {"lang": "fr"}, ["gamma"], v[2:3]),
            ],
        )
        hits = await store.search(docs, unit([[1, 0.2, 0]])[0], top_k=3)
        assert [h.text for h in hits] == ["alpha", "beta", "gamma"]
        assert hits[0].score > hits[1].score > hits[2].score
        exact = await store.search(docs, unit([[1, 0.2, 0]])[0], top_k=3, exact=True)
        assert [h.chunk_id for h in exact] == [h.chunk_id for h in hits]
        filtered = await store.search(docs, unit([[1, 0.2, 0]])[0], top_k=3, filters={"lang": "fr"})
        assert [h.document_id for h in filtered] == ["b"]
        assert filtered[0].metadata == {"lang": "fr"}

        # Re-ingesting an id replaces its chunks: no duplicates, new text.
        await store.replace_documents(docs, [DocumentChunks("a", {}, ["delta"], v[3:4])])
        texts = {h.text for h in await store.search(docs, v[0], top_k=10)}
        assert texts == {"delta", "gamma"}

        # A failing replacement (a 2-d vector in a 3-d collection) leaves the old version.
        with pytest.raises(InvalidData):  # 400: the caller's data, not a server fault
            await store.replace_documents(
                docs, [DocumentChunks("a", {}, ["broken"], np.ones((1, 2), np.float32))]
            )
        texts = {h.text for h in await store.search(docs, v[0], top_k=10)}
        assert texts == {"delta", "gamma"}

        assert await store.delete_document(docs, "a")
        assert not await store.delete_document(docs, "a")
        [info] = await store.list_collections()
        assert (info["name"], info["documents"], info["chunks"]) == ("docs", 1, 1)
        await store.delete_collection("docs")
        assert await store.list_collections() == []
        with pytest.raises(CollectionNotFound):
            await store.collection("docs")
    finally:
        await store.close()


def test_embedded_store(embedded):
    run(exercise(embedded))


def test_external_store_by_url(external):
    run(exercise(external))
    # Migrations are recorded and never re-applied.
    assert migrate(external.database_url) == MIGRATIONS[-1][0]
    with psycopg.connect(external.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
            MIGRATIONS
        )


def test_embedded_data_survives_a_restart(embedded):
    async def write():
        store = await open_store(embedded)
        docs = await store.ensure_collection("kept", "m", 3)
        await store.replace_documents(
            docs, [DocumentChunks("x", {}, ["kept text"], unit([[1, 2, 3]]))]
        )
        await store.close()

    async def read():
        store = await open_store(embedded)
        try:
            docs = await store.collection("kept")
            return [h.text for h in await store.search(docs, unit([[1, 2, 3]])[0], top_k=1)]
        finally:
            await store.close()

    run(write())
    stop_embedded(embedded.data_dir)
    assert not (embedded.data_dir / "postmaster.pid").exists()
    assert run(read()) == ["kept text"]


def random_unit(n: int, dims: int = 384) -> np.ndarray:
    v = np.random.default_rng(n).random((n, dims), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_stopping_postgres_mid_ingest_leaves_nothing_partial_and_the_store_recovers(tmp_path):
    config = StoreConfig(data_dir=tmp_path / "pgdata", timeout_s=1.0)

    async def scenario():
        store = await open_store(config)
        docs = await store.ensure_collection("big", "m", 384)
        batch = [
            DocumentChunks(
                f"d{i}", {"i": i}, [f"text {i}.{j}" for j in range(400)], random_unit(400)
            )
            for i in range(60)
        ]
        writing = asyncio.create_task(store.replace_documents(docs, batch))
        await asyncio.sleep(0.2)  # the COPY is under way
        await asyncio.to_thread(stop_embedded, config.data_dir)
        with pytest.raises(StoreUnavailable):
            await writing
        start = asyncio.get_running_loop().time()
        with pytest.raises(StoreUnavailable):
            await store.collection("big")
        assert asyncio.get_running_loop().time() - start < 3  # fails fast, never hangs
        await asyncio.to_thread(embedded_url, config.data_dir)
        # The same store, without a restart: the pool checks its connections and reconnects.
        back = asyncio.get_running_loop().time()
        while True:
            try:
                assert (await store.collection("big")).id == docs.id
                break
            except StoreUnavailable:
                assert asyncio.get_running_loop().time() - back < 5, "no recovery in 5 s"
        assert await store.list_collections() == [
            {**(await store.list_collections())[0], "documents": 0, "chunks": 0}
        ]
        await store.replace_documents(docs, batch)  # the same ingest again completes it
        counts = (await store.list_collections())[0]
        await store.close()
        return counts

    try:
        counts = run(scenario())
    finally:
        stop_embedded(config.data_dir)
    assert (counts["documents"], counts["chunks"]) == (60, 60 * 400)


def test_embedded_data_survives_kill_9(tmp_path):
    config = StoreConfig(data_dir=tmp_path / "pgdata")

    async def write():
        store = await open_store(config)
        docs = await store.ensure_collection("durable", "m", 3)
        await store.replace_documents(
            docs, [DocumentChunks("x", {}, ["committed"], unit([[1, 0, 0]]))]
        )
        await store.close()

    async def read():
        store = await open_store(config)
        try:
            docs = await store.collection("durable")
            return [h.text for h in await store.search(docs, unit([[1, 0, 0]])[0], top_k=1)]
        finally:
            await store.close()

    try:
        run(write())
        pid = int((config.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)  # no shutdown at all: recovery replays the WAL
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert run(read()) == ["committed"]
    finally:
        stop_embedded(config.data_dir)
