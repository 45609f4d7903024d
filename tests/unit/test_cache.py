"""serve_app/cache.py: the LRU, the encodings and keys, and Redis up, down and back (no Ray).

Redis tests use TEST_REDIS_URL when set (CI starts one), else a private redis-server.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from serve_app.cache import (
    EmbeddingCache,
    LocalCache,
    RedisCache,
    ResponseCache,
    open_cache,
)
from serve_app.config import CacheConfig

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen | None = None, timeout_s: float = 10) -> None:
    """Until the server at `url` answers PING: a daemonized or just-started one may not yet."""
    client = redis.Redis.from_url(url, socket_timeout=0.2)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                exited = process is not None and process.poll() is not None
                if exited or time.monotonic() > deadline:
                    raise RuntimeError(f"no Redis answering at {url}") from None
                time.sleep(0.02)
    finally:
        client.close()


class RedisServer:
    """A throwaway redis-server without persistence, stoppable and restartable on its port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        assert REDIS_SERVER
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.url, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def unit_vectors(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- in-process LRU ---------------------------------------------------------------------------


def test_local_lru_bound_and_ttl() -> None:
    clock = Clock()
    cache = LocalCache(2, ttl_s=10.0, name="search", timer=clock)

    async def run() -> None:
        await cache.set_many({"a": b"1", "b": b"2"})
        assert await cache.get_many(["a"]) == [b"1"]  # a is now the most recent
        await cache.set_many({"c": b"3"})  # evicts b, the least recently used
        assert await cache.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
        clock.now = 9.9
        assert await cache.get_many(["a", "c"]) == [b"1", b"3"]
        clock.now = 10.0
        assert await cache.get_many(["a", "c"]) == [None, None]
        assert await cache.get_many([]) == []

    asyncio.run(run())
    snap = cache.snapshot()
    assert snap == {"backend": "local", "hits": 5, "misses": 3, "errors": 0, "hit_rate": 0.625}


def test_local_cache_is_bounded_in_bytes_and_entries() -> None:
    cache = LocalCache(100, ttl_s=60.0, max_bytes=64 * 1024)
    big = b"x" * 3000  # each counts 3000 bytes + its key: about 20 fit, not 100

    async def run() -> None:
        await cache.set_many({f"big{i}": big for i in range(50)})
        assert len(cache) <= 64 * 1024 // 3000 and cache.size_bytes <= 64 * 1024
        assert await cache.get_many(["big49"]) == [big]  # the newest stay
        await cache.set_many({f"small{i}": b"s" for i in range(500)})
        assert len(cache) == 100  # small values: the entry bound
        await cache.set_many({"huge": b"h" * (64 * 1024 // 16 + 1)})  # over 1/16: not stored
        assert await cache.get_many(["huge"]) == [None]
        assert len(cache) == 100

    asyncio.run(run())


def test_open_cache_bounds_bytes() -> None:
    cache = open_cache(CacheConfig(response_bytes=2**16, response_entries=10), "search")
    assert isinstance(cache, LocalCache) and cache.max_value_bytes == 2**12

    async def run() -> None:
        await cache.set_many({f"k{i}": b"v" * 2**12 for i in range(40)})
        assert cache.size_bytes <= 2**16 and len(cache) < 40

    asyncio.run(run())


def test_local_cache_threads() -> None:
    cache = LocalCache(1000, ttl_s=60.0)

    def worker(n: int) -> None:
        async def run() -> None:
            for i in range(200):
                await cache.set_many({f"{n}:{i}": bytes([i % 256])})
                assert await cache.get_many([f"{n}:{i}"]) == [bytes([i % 256])]

        asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.snapshot()["hits"] == 800


def test_open_cache() -> None:
    config = CacheConfig()
    embedding = open_cache(config, "embedding")
    assert isinstance(embedding, LocalCache) and embedding.name == "embedding"
    assert isinstance(open_cache(config, "rerank"), LocalCache)
    assert open_cache(CacheConfig(embedding_entries=0), "embedding") is None
    assert open_cache(CacheConfig(response_entries=0), "search") is None
    assert isinstance(open_cache(CacheConfig(response_entries=0), "embedding"), LocalCache)
    remote = open_cache(CacheConfig(redis_url="redis://:hunter2@127.0.0.1:1/0"), "search")
    assert isinstance(remote, RedisCache) and "hunter2" not in remote._where
    with pytest.raises(ValueError):
        open_cache(config, "chat")
    for url in ("http://127.0.0.1:6379", "redis://h:port/0", "redis://:pw@h:1/0?nosuch=1"):
        with pytest.raises(ValueError) as error:  # at start, not per request
            open_cache(CacheConfig(redis_url=url), "search")
        assert "pw" not in str(error.value)


# --- encodings and keys ----------------------------------------------------------------------


def test_embedding_round_trip() -> None:
    cache = LocalCache(100, ttl_s=60.0, name="embedding")
    bf16 = EmbeddingCache(cache, "all-MiniLM-L6-v2:bf16")
    fp32 = EmbeddingCache(cache, "all-MiniLM-L6-v2:fp32")
    texts = ["a cat", "a dog", "a cat", "\ud800 lone surrogate"]
    vectors = unit_vectors(4)
    vectors[2] = vectors[0]  # the same text embeds the same

    async def run() -> None:
        assert await bf16.lookup(texts) == [None] * 4
        await bf16.store(texts, vectors, [3, 4, 3, 5])
        found = await bf16.lookup(["a dog", "a cat", "unseen", "a cat", texts[3]])
        assert found[2] is None
        for hit, row, tokens in zip(
            [found[0], found[1], found[3], found[4]], [1, 0, 0, 3], [4, 3, 3, 5], strict=True
        ):
            assert hit is not None
            vector, count = hit
            assert vector.dtype == np.float32 and vector.tobytes() == vectors[row].tobytes()
            assert count == tokens
        found[0][0][:] = 0  # decoded vectors are the caller's own, writable copies
        hit = (await bf16.lookup(["a dog"]))[0]
        assert hit is not None and hit[0].tobytes() == vectors[1].tobytes()
        assert await fp32.lookup(["a cat", "a dog"]) == [None, None]  # another precision
        with pytest.raises(ValueError):
            await bf16.store(["x"], vectors[:2], [1])

    asyncio.run(run())


def test_embedding_corrupt_value_is_a_miss() -> None:
    cache = LocalCache(10, ttl_s=60.0)
    embeddings = EmbeddingCache(cache, "m:fp32")

    async def run() -> None:
        await cache.set_many({embeddings.key("x"): b"\x01\x00", embeddings.key("y"): b"12345"})
        assert await embeddings.lookup(["x", "y"]) == [None, None]

    asyncio.run(run())


def test_response_key_and_round_trip() -> None:
    responses = ResponseCache(LocalCache(10, ttl_s=60.0, name="search"), "search")
    one = {"query": "battery", "top_k": 5, "filters": {"stars": 5, "lang": "en"}}
    same = {"filters": {"lang": "en", "stars": 5}, "top_k": 5, "query": "battery"}
    key = responses.key("reviews:v3", one)
    assert key == responses.key("reviews:v3", same)
    assert key.startswith("rag:search:reviews:v3:")
    assert key != responses.key("reviews:v4", one)  # a new collection version: a new key
    assert key != responses.key("reviews:v3", {**one, "top_k": 6})
    assert key != ResponseCache(responses.cache, "rerank").key("reviews:v3", one)
    answer = {"results": [{"id": "r1", "score": np.float32(0.5), "text": "two days"}]}

    async def run() -> None:
        assert await responses.get(key) is None
        await responses.put(key, answer)
        assert await responses.get(key) == {
            "results": [{"id": "r1", "score": 0.5, "text": "two days"}]
        }
        await responses.put(key + "x", {"bad": object()})  # not cached, not raised
        assert await responses.get(key + "x") is None

    asyncio.run(run())
    assert responses.snapshot()["hits"] == 1


# --- Redis -----------------------------------------------------------------------------------


def test_redis_round_trip_and_ttl(redis_url: str) -> None:
    namespace = f"test-{uuid.uuid4().hex}"

    async def run() -> None:
        cache = RedisCache(redis_url, ttl_s=60.0, timeout_s=0.5, name="embedding")
        embeddings = EmbeddingCache(cache, f"{namespace}:fp32")
        vectors = unit_vectors(3, seed=1)
        await embeddings.store(["a", "b", "a"], vectors[[0, 1, 0]], [1, 2, 1])
        found = await embeddings.lookup(["b", "a", "c", "a"])
        assert found[2] is None
        assert [hit[1] for hit in (found[0], found[1], found[3]) if hit] == [2, 1, 1]
        assert found[0] is not None and found[0][0].tobytes() == vectors[1].tobytes()
        assert found[1] is not None and found[1][0].tobytes() == vectors[0].tobytes()

        responses = ResponseCache(cache, "search")
        key = responses.key(namespace, {"query": "q"})
        await responses.put(key, {"results": [1, 2]})
        assert await responses.get(key) == {"results": [1, 2]}

        short = RedisCache(redis_url, ttl_s=0.2, timeout_s=0.5, name="search")
        await short.set_many({f"{namespace}:short": b"v"})
        assert await short.get_many([f"{namespace}:short"]) == [b"v"]
        await asyncio.sleep(0.35)
        assert await short.get_many([f"{namespace}:short"]) == [None]
        assert cache.snapshot()["errors"] == short.snapshot()["errors"] == 0
        assert cache.snapshot()["backend"] == "redis"
        await cache.aclose()
        await short.aclose()

    asyncio.run(run())


async def timed_misses(cache: RedisCache, calls: int = 5) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        assert await cache.get_many(["k1", "k2"]) == [None, None]
        await cache.set_many({"k1": b"v"})  # skipped, never raised
    return time.perf_counter() - started


def test_redis_closed_port_is_misses() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"

    async def run() -> None:
        cache = RedisCache(url, ttl_s=60.0, timeout_s=0.05, name="embedding")
        assert await timed_misses(cache) < 0.5
        snap = cache.snapshot()
        # One refused connection, then the backoff skips Redis for the other calls.
        assert snap["errors"] == 1 and snap["misses"] == 10 and snap["hits"] == 0
        await cache.aclose()

    asyncio.run(run())


def test_redis_unresponsive_is_misses() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def run() -> None:
            cache = RedisCache(url, ttl_s=60.0, timeout_s=0.05, name="search")
            assert await timed_misses(cache) < 0.5
            assert cache.snapshot()["errors"] >= 1
            await cache.aclose()

        asyncio.run(run())


@pytest.mark.skipif(not REDIS_SERVER, reason="needs redis-server to stop and restart one")
def test_redis_stopped_mid_test_then_back(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer().start()

    async def run() -> None:
        cache = RedisCache(server.url, ttl_s=60.0, timeout_s=0.05, name="rerank", backoff_s=0.2)
        await cache.set_many({"k1": b"up"})
        assert await cache.get_many(["k1"]) == [b"up"]

        server.stop()
        assert await timed_misses(cache) < 0.5
        errors = cache.snapshot()["errors"]
        assert errors >= 1
        await asyncio.sleep(0.25)  # past the backoff: Redis is tried again, and fails again
        assert await cache.get_many(["k1"]) == [None]
        assert cache.snapshot()["errors"] == errors + 1

        server.start()  # the same port, empty (no persistence)
        await asyncio.sleep(0.25)
        await cache.set_many({"k1": b"back"})
        assert await cache.get_many(["k1"]) == [b"back"]
        assert cache.snapshot()["errors"] == errors + 1
        await cache.aclose()

    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            asyncio.run(run())
    finally:
        server.stop()
    warnings = [r for r in caplog.records if "Redis at" in r.getMessage()]
    assert len(warnings) == 1  # at most one warning per 30 s
    assert f"127.0.0.1:{server.port}" in warnings[0].getMessage()
