"""The vector store against real PostgreSQL + pgvector, in process (no Ray)."""

import asyncio
import concurrent.futures
import os
import signal
import socket
import time
from types import SimpleNamespace

import numpy as np
import psutil
import psycopg
import pytest

from serve_app.config import StoreConfig
from serve_app.contracts import DocumentChunks
from serve_app.errors import (
    CollectionChanged,
    CollectionNotFound,
    InvalidData,
    ModelMismatch,
    StoreBusy,
    StoreUnavailable,
)
from serve_app.store import open_store
from serve_app.store.embedded import embedded_url, stop_embedded
from serve_app.store.schema import MIGRATION_LOCK, MIGRATIONS, migrate
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


def test_the_embedded_server_starts_with_its_shared_buffers(tmp_path, caplog):
    data_dir = tmp_path / "pgdata"

    def shared_buffers(url: str) -> str:
        with psycopg.connect(url) as conn:
            return conn.execute("SHOW shared_buffers").fetchone()[0]

    try:
        assert shared_buffers(embedded_url(data_dir, "160MB")) == "160MB"
        # A running server keeps what it started with; the new value waits for its next start.
        assert shared_buffers(embedded_url(data_dir, "200MB")) == "160MB"
        assert "apply when it next starts" in caplog.text
        stop_embedded(data_dir)
        assert shared_buffers(embedded_url(data_dir, "200MB")) == "200MB"
    finally:
        stop_embedded(data_dir)
    with pytest.raises(ValueError):
        StoreConfig(shared_buffers="1 GB; fsync = off")


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


# --- concurrency, timeouts and identity ------------------------------------------------------


async def version_of(store, name: str) -> int:
    return (await store.collection(name)).version


def test_deleting_a_missing_document_leaves_the_version_alone(external):
    async def scenario():
        store = await open_store(external)
        try:
            docs = await store.ensure_collection("versions", "m", 3)
            await store.replace_documents(docs, [DocumentChunks("a", {}, ["x"], unit([[1, 0, 0]]))])
            before = await version_of(store, "versions")
            # Nothing deleted: no new version, so cached and precomputed answers stay valid.
            assert not await store.delete_document(docs, "missing")
            assert await version_of(store, "versions") == before
            assert await store.delete_document(docs, "a")
            assert await version_of(store, "versions") == before + 1
            await store.delete_collection("versions")
        finally:
            await store.close()

    run(scenario())


async def timed(coro, limit_s: float = 1.0) -> float:
    """Seconds `coro` took; fails (instead of hanging) past five times `limit_s`."""
    start = time.perf_counter()
    await asyncio.wait_for(coro, 5 * limit_s)
    return time.perf_counter() - start


async def other_collection_keeps_working(store, other) -> list[float]:
    """Seconds a search and an ingest of `other` took."""
    v = unit([[0, 1, 0]])
    return [
        await timed(store.search(other, v[0], top_k=3)),
        await timed(store.replace_documents(other, [DocumentChunks("n", {}, ["new"], v)])),
    ]


async def create_collection(store) -> float:
    """Seconds creating a new collection (and its index) took."""
    return await timed(store.ensure_collection(f"fresh{time.monotonic_ns()}", "m", 3))


def test_deleting_a_collection_never_blocks_the_others(external):
    """A delete waiting on its collection (an ingest into it in flight, or a long search of
    it) holds no lock that stops other collections' searches, ingests or creations."""
    config = external.model_copy(update={"timeout_s": 2.0})

    async def scenario():
        store = await open_store(config)
        try:
            v = unit([[1, 0, 0], [0, 1, 0]])
            other = await store.ensure_collection("other", "m", 3)
            await store.replace_documents(other, [DocumentChunks("o", {}, ["kept"], v[:1])])
            for name in ("busy", "read"):
                c = await store.ensure_collection(name, "m", 3)
                await store.replace_documents(c, [DocumentChunks("d", {}, ["gone"], v[1:])])
            busy, read = await store.collection("busy"), await store.collection("read")

            async with await psycopg.AsyncConnection.connect(external.database_url) as holder:
                # An ingest into "busy" in flight: it holds the collection's row.
                await holder.execute(
                    "UPDATE collections SET version = version + 1 WHERE id = %s", (busy.id,)
                )
                deleting = asyncio.create_task(store.delete_collection("busy"))
                await asyncio.sleep(0.5)  # the delete now waits for that ingest
                assert not deleting.done()
                took = await other_collection_keeps_working(store, other)
                took.append(await create_collection(store))
                assert max(took) < 1.0, took
                await holder.commit()
            await asyncio.wait_for(deleting, 5)

            async with await psycopg.AsyncConnection.connect(external.database_url) as holder:
                # A long search of "read": its transaction uses `chunks` until it ends, which
                # is what dropping the index waits for (bounded by timeout_s, then deferred).
                await holder.execute(
                    "SELECT count(*) FROM chunks WHERE collection_id = %s", (read.id,)
                )
                deleting = asyncio.create_task(store.delete_collection("read"))
                await asyncio.sleep(0.5)
                took = await other_collection_keeps_working(store, other)
                assert max(took) < 1.0, took
                # Creating an index waits for the index drop in progress, up to timeout_s
                # (then 503 store_busy): the one thing a delete holds up, and only so long.
                try:
                    assert await create_collection(store) < config.timeout_s + 0.5
                except StoreBusy as busy:
                    assert busy.status == 503
                await asyncio.wait_for(deleting, 2 * config.timeout_s + 2)  # answered anyway
                await holder.commit()
            with pytest.raises(CollectionNotFound):
                await store.collection("read")
            # The index the delete could not drop in time goes at the next purge.
            assert await store.drop_orphan_indexes() == [f"chunks_hnsw_{read.id}"]
            async with store.connection() as conn:
                left = await (
                    await conn.execute(
                        "SELECT count(*) FROM pg_class WHERE relname = ANY(%s)",
                        ([f"chunks_hnsw_{busy.id}", f"chunks_hnsw_{read.id}"],),
                    )
                ).fetchone()
            assert left == (0,)
            assert [h.text for h in await store.search(other, v[1], top_k=5)] == ["new", "kept"]
        finally:
            for info in await store.list_collections():
                await store.delete_collection(info["name"])
            await store.close()

    run(scenario())


def test_a_delete_racing_an_ingest_answers_404_or_409(external):
    async def scenario():
        store = await open_store(external)
        v = unit([[1, 0, 0]])
        try:
            # Deleted between creating the collection and storing into it: 409, nothing kept
            # (a foreign-key failure, a 500, before).
            race = await store.ensure_collection("race", "m", 3)
            await store.delete_collection("race")
            with pytest.raises(CollectionChanged) as caught:
                await store.replace_documents(race, [DocumentChunks("a", {}, ["x"], v)])
            assert caught.value.status == 409
            with pytest.raises(CollectionNotFound):  # 404
                await store.delete_document(race, "a")

            # Many rounds at once: each ingest and delete ends in success, 404 or 409.
            async def ingest(i: int) -> None:
                c = await store.ensure_collection("race", "m", 3)
                await store.replace_documents(c, [DocumentChunks(f"d{i}", {}, ["x"], v)])

            outcomes = await asyncio.gather(
                *(call for i in range(40) for call in (ingest(i), store.delete_collection("race"))),
                return_exceptions=True,
            )
            failures = [o for o in outcomes if o is not None]
            assert all(isinstance(o, (CollectionChanged, CollectionNotFound)) for o in failures)
            assert {o.status for o in failures} <= {404, 409}
            assert len(failures) < len(outcomes)  # some succeeded
        finally:
            for info in await store.list_collections():
                await store.delete_collection(info["name"])
            await store.close()

    run(scenario())


@pytest.fixture
def silent_server():
    """A TCP port that takes connections and never answers: a database host that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes handshakes; nothing ever replies
        yield f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/postgres"


def test_migrate_and_open_honour_the_timeout_against_a_silent_server(silent_server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        attempt = pool.submit(migrate, silent_server, 2.0)
        # Without a connect timeout this waited for the driver's default (over 2 minutes).
        with pytest.raises(psycopg.OperationalError):
            attempt.result(timeout=10)
        assert time.perf_counter() - start < 3.5

    async def scenario():
        start = time.perf_counter()
        store = await open_store(StoreConfig(database_url=silent_server, timeout_s=2.0))
        opened = time.perf_counter() - start
        try:
            start = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.collection("x"), 10)
            return opened, time.perf_counter() - start
        finally:
            await asyncio.wait_for(store.close(), 10)

    opened, failed = run(scenario())
    assert opened < 3.5 and failed < 3.5, (opened, failed)


def test_migrate_waits_for_locks_no_longer_than_the_timeout(external):
    with (
        psycopg.connect(external.database_url, autocommit=True) as holder,
        holder.transaction(),  # another replica's migration, stuck
    ):
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        start = time.perf_counter()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            migrate(external.database_url, 1.0)
        assert time.perf_counter() - start < 2.5
    assert migrate(external.database_url, 1.0) == MIGRATIONS[-1][0]


class FakeEmbedder:
    """The Embedder's `embed.remote`, without Ray: every text embeds to the same vector."""

    def __init__(self) -> None:
        self.embed = SimpleNamespace(remote=self._embed)

    async def _embed(self, texts: list[str]):
        return SimpleNamespace(model="m", vectors=np.repeat(unit([[1, 0, 0]]), len(texts), 0))


def test_databases_sharing_one_redis_never_see_each_others_results(external, redis_url):
    """Two databases whose collections have the same name, id and version: a search in one
    is never answered from the other's cached result (keys name the collection's uid)."""
    from serve_app.config import AppConfig, CacheConfig
    from serve_app.pipelines.retrieval import Retriever
    from serve_app.protocol.documents import SearchRequest

    with psycopg.connect(external.database_url, autocommit=True) as admin:
        for name in ("shard_one", "shard_two"):
            admin.execute(f"DROP DATABASE IF EXISTS {name}")
            admin.execute(f"CREATE DATABASE {name}")
    urls = [external.database_url.rsplit("/", 1)[0] + f"/{n}" for n in ("shard_one", "shard_two")]
    config = AppConfig(cache=CacheConfig(redis_url=redis_url, redis_timeout_s=2.0))

    async def scenario() -> list[tuple[list[str], bool]]:
        answers = []
        for url in urls:
            store = await open_store(StoreConfig(database_url=url))
            try:
                docs = await store.ensure_collection("docs", "m", 3)
                text = f"only in {url.rsplit('/', 1)[1]}"
                await store.replace_documents(
                    docs, [DocumentChunks("a", {}, [text], unit([[1, 0, 0]]))]
                )
                docs = await store.collection("docs")
                assert (docs.id, docs.version) == (1, 1)  # the same in both databases
                retriever = Retriever(FakeEmbedder(), None, store, config)
                request = SearchRequest(collection="docs", query="which database?")
                for _ in range(2):  # the second is cached
                    got = await retriever.retrieve(request)
                    answers.append(([h.text for h in got.hits], got.cached_age_s is not None))
                await retriever.cache.cache.aclose()
            finally:
                await store.close()
        return answers

    assert run(scenario()) == [
        (["only in shard_one"], False),
        (["only in shard_one"], True),
        (["only in shard_two"], False),
        (["only in shard_two"], True),
    ]


class FreezableProxy:
    """A TCP relay to PostgreSQL that can go silent without closing anything: a network
    link that died without a word (a host lost, a NAT entry expired)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, client_r, client_w) -> None:
        if self.frozen.is_set():
            await asyncio.Event().wait()  # accepted, never answered
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(reader, writer) -> None:
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()
                writer.write(data)
                await writer.drain()

        await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))


def test_precomputed_answers_catch_missed_changes_and_silent_links(external):
    """The ingress's answers in memory: a change whose notification never came is caught by
    the periodic version check, and a link that went silent is noticed within the liveness
    interval and the store's timeout."""
    from psycopg.types.json import Jsonb

    from serve_app.precompute.answers import PrecomputedAnswers
    from serve_app.precompute.store import PopularStore

    async def until(condition, limit_s: float) -> float:
        start = time.perf_counter()
        while not condition():
            assert time.perf_counter() - start < limit_s, f"not within {limit_s} s"
            await asyncio.sleep(0.05)
        return time.perf_counter() - start

    async def scenario():
        store = await open_store(external.model_copy(update={"timeout_s": 1.0}))
        proxy = FreezableProxy(int(external.database_url.rsplit(":", 1)[1].split("/")[0]))
        port = await proxy.start()
        listen_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        answers = PrecomputedAnswers(
            listen_url, PopularStore(store), timeout_s=1.0, versions_check_s=0.5, liveness_s=0.3
        )
        answers.reconnect_s = 0.2
        follower = asyncio.create_task(answers.run())
        try:
            docs = await store.ensure_collection("popular", "m", 3)
            async with store.connection() as conn:
                await conn.execute(
                    "INSERT INTO precomputed_answers (collection_id, kind, key, version, answer)"
                    " VALUES (%s, 'search', 'k', %s, %s)",
                    (docs.id, docs.version, Jsonb({"results": []})),
                )
            await until(lambda: answers.subscribed and answers.entries, 5)
            # A new version whose notification is lost (triggers off for this session).
            async with store.connection(transaction=True) as conn:
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(
                    "UPDATE collections SET version = version + 1 WHERE id = %s", (docs.id,)
                )
            assert answers.subscribed
            await until(lambda: not answers.entries, 2)  # versions_check_s and a little

            proxy.frozen.set()  # the link dies in silence
            stale_s = await until(lambda: not answers.subscribed, 0.3 + 1.0 + 1.0)
            proxy.frozen.clear()
            # It comes back once psycopg has given up cancelling over the dead link (10 s).
            await until(lambda: answers.subscribed, 20)
            return stale_s
        finally:
            follower.cancel()
            await store.delete_collection("popular")
            await store.close()

    print("seconds answering over a silent link:", run(scenario()))


def test_an_ingest_into_an_existing_collection_takes_no_table_lock(external):
    """While another collection's ingest is in flight (its rows going into `chunks`), an
    ingest into an existing collection goes ahead; creating a new collection's index waits
    at most timeout_s, then answers 503 store_busy."""
    config = external.model_copy(update={"timeout_s": 1.0})

    async def scenario():
        store = await open_store(config)
        v = unit([[1, 0, 0]])
        try:
            existing = await store.ensure_collection("existing", "m", 3)
            writing = await store.ensure_collection("writing", "m", 3)
            async with await psycopg.AsyncConnection.connect(external.database_url) as holder:
                # A long ingest into "writing": its transaction holds `chunks` for writing.
                await holder.execute(
                    "INSERT INTO documents (collection_id, id) VALUES (%s, 'slow')", (writing.id,)
                )
                await holder.execute(
                    "INSERT INTO chunks (collection_id, document_id, ordinal, text, embedding)"
                    " VALUES (%s, 'slow', 0, 'x', '[1,0,0]')",
                    (writing.id,),
                )
                took = await timed(store.ensure_collection("existing", "m", 3))
                took += await timed(
                    store.replace_documents(existing, [DocumentChunks("a", {}, ["x"], v)])
                )
                assert took < 1.0
                start = time.perf_counter()
                with pytest.raises(StoreBusy):
                    await asyncio.wait_for(store.ensure_collection("new", "m", 3), 10)
                assert time.perf_counter() - start < config.timeout_s + 1
                await holder.rollback()
            assert (await store.ensure_collection("new", "m", 3)).name == "new"
        finally:
            for info in await store.list_collections():
                await store.delete_collection(info["name"])
            await store.close()

    run(scenario())
