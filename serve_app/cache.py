"""Embedding and response caches: an in-process LRU per replica, or Redis shared by all.

A cache is an optimisation, never a dependency: no method here raises for a backend failure.
Where Redis is down or slow, a lookup is all misses and a store is skipped, so the request runs
as if the cache were off. Values are bytes; the typed layers above (`EmbeddingCache`,
`ResponseCache`) own the encodings and the key schemes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np
import orjson
from cachetools import TTLCache
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisError

from serve_app import metrics
from serve_app.cluster import client_name
from serve_app.config import CacheConfig

logger = logging.getLogger("ray.serve")

RESPONSE_KINDS = ("search", "rerank")


class Cache(ABC):
    """A byte-valued key-value cache that counts its hits, misses and errors.

    Counting lives here rather than in each backend so that `/v1/status` and the Ray metrics
    read the same numbers whichever backend is configured.
    """

    backend: ClassVar[str]

    def __init__(self, name: str, max_value_bytes: int | None = None) -> None:
        self.name = name
        self.max_value_bytes = max_value_bytes  # larger values are not stored
        self._counts_lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._errors = 0

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys`, in order; None for each key not found (or not reachable)."""
        if not keys:
            return []
        values = await self._get_many(keys)
        hits = sum(value is not None for value in values)
        self._count(hits=hits, misses=len(values) - hits)
        return values

    async def set_many(self, items: dict[str, bytes]) -> None:
        """Store `items` with the cache's TTL; skipped where the backend is unavailable, and
        for each value over `max_value_bytes`."""
        if self.max_value_bytes is not None:
            items = {k: v for k, v in items.items() if len(v) <= self.max_value_bytes}
        if items:
            await self._set_many(items)

    async def aclose(self) -> None:
        """Release connections (a replica's shutdown); the cache stays usable afterwards."""
        return None  # an in-process cache holds none

    def snapshot(self) -> dict[str, Any]:
        """Counts since this object was created, for `/v1/status`."""
        with self._counts_lock:
            hits, misses, errors = self._hits, self._misses, self._errors
        lookups = hits + misses
        return {
            "backend": self.backend,
            "hits": hits,
            "misses": misses,
            "errors": errors,
            "hit_rate": round(hits / lookups, 4) if lookups else 0.0,
        }

    @abstractmethod
    async def _get_many(self, keys: list[str]) -> list[bytes | None]: ...

    @abstractmethod
    async def _set_many(self, items: dict[str, bytes]) -> None: ...

    def _count(self, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._counts_lock:
            self._hits += hits
            self._misses += misses
            self._errors += errors
        # Ray counters refuse an increment of 0.
        tags = {"cache": self.name}
        recorded = metrics.cache_metrics()
        if hits:
            recorded.hits.inc(hits, tags=tags)
        if misses:
            recorded.misses.inc(misses, tags=tags)
        if errors:
            recorded.errors.inc(errors, tags=tags)


class LocalCache(Cache):
    """A TTL cache in this process, bounded in entries and in bytes: each replica has its own.

    cachetools bounds one sum (`maxsize`, with `getsizeof`): it counts bytes here, and each
    entry counts at least `max_bytes / max_entries`, so neither bound can be passed. Entries
    leave in TTL order, then least recently used first. The lock makes it safe where replicas
    call it from worker threads as well as the event loop; every operation under it is a few
    dict moves, never I/O.
    """

    backend = "local"
    KEY_BYTES = 128  # a key and its bookkeeping, roughly

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        *,
        max_bytes: int = 2**30,
        name: str = "local",
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, max_value_bytes=max_bytes // 16)
        floor = max(1, max_bytes // max_entries)
        self._entries: TTLCache[str, bytes] = TTLCache(
            max_bytes, ttl_s, timer=timer, getsizeof=lambda v: max(floor, len(v) + self.KEY_BYTES)
        )
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """The bytes the entries count for (values, keys, and each entry's floor)."""
        with self._lock:
            return int(self._entries.currsize)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __bool__(self) -> bool:
        # An empty cache is still a cache: callers test `if cache` for "turned on".
        return True

    async def _get_many(self, keys: list[str]) -> list[bytes | None]:
        with self._lock:
            return [self._entries.get(key) for key in keys]

    async def _set_many(self, items: dict[str, bytes]) -> None:
        with self._lock:
            self._entries.update(items)


class RedisCache(Cache):
    """Redis shared by every replica (and every restart), with failures absorbed.

    Each operation is one round trip (MGET, or one pipeline of SETs with PX) bounded by
    `timeout_s`; redis-py's own retries are off, since a retried cache read costs more than
    the miss it would save. After a failure Redis is skipped for `backoff_s`, so a Redis that
    is down costs one refused connection a second rather than one per request. The client is
    created on first use, on the event loop that uses it: redis.asyncio connections belong to
    one loop.
    """

    backend = "redis"
    WARN_EVERY_S = 30.0

    def __init__(
        self,
        url: str,
        ttl_s: float,
        timeout_s: float,
        *,
        name: str = "redis",
        backoff_s: float = 1.0,
        max_value_bytes: int | None = None,
    ) -> None:
        super().__init__(name, max_value_bytes)
        self._url = url
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._timeout_s = timeout_s
        # A malformed URL (scheme, port, an unknown ?option) is a configuration error: raised
        # here, at start, rather than on every request. Building a connection does no I/O.
        try:
            password = parse_url(url).get("password")
            self._new_client().connection_pool.make_connection()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid redis_url: {exc}") from None
        self._backoff_s = backoff_s
        self._where = _redacted(url)
        self._secrets = [password] if password else []
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0
        self._last_warning = -float("inf")
        self._unreported = 0

    async def _get_many(self, keys: list[str]) -> list[bytes | None]:
        if self._skipping():
            return [None] * len(keys)
        try:
            async with asyncio.timeout(self._deadline_s()):
                values = await self._redis().mget(keys)
        except (RedisError, OSError) as exc:  # OSError includes TimeoutError
            self._failed(exc)
            return [None] * len(keys)
        return list(values)

    async def _set_many(self, items: dict[str, bytes]) -> None:
        if self._skipping():
            return
        try:
            async with asyncio.timeout(self._deadline_s()):
                pipe = self._redis().pipeline(transaction=False)
                for key, value in items.items():
                    pipe.set(key, value, px=self._ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _deadline_s(self) -> float:
        # The socket timeouts bound the connect and each read; this bounds the whole call
        # (name resolution, a slow write of a large pipeline) at about the same budget.
        return 2 * self._timeout_s + 0.01

    def _skipping(self) -> bool:
        return time.monotonic() < self._down_until

    def _redis(self) -> Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = self._new_client()
            self._loop = loop
        return self._client

    def _new_client(self) -> Redis:
        return Redis.from_url(
            self._url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            client_name=client_name(self.name),
        )

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._backoff_s
        self._count(errors=1)
        self._unreported += 1
        now = time.monotonic()
        if now - self._last_warning >= self.WARN_EVERY_S:
            message = f"{type(exc).__name__}: {exc}"
            for secret in self._secrets:
                message = message.replace(secret, "***")
            logger.warning(
                "%s cache: Redis at %s failed %d time(s) (%s); serving misses, retrying in %.1f s",
                self.name,
                self._where,
                self._unreported,
                message,
                self._backoff_s,
            )
            self._last_warning = now
            self._unreported = 0


def open_cache(config: CacheConfig, kind: str) -> Cache | None:
    """The cache for `kind` ("embedding", "search" or "rerank"); None where it is turned off.

    With `redis_url` the entry count is not enforced here: Redis's `maxmemory` policy bounds it
    (each value is still bounded here, at 1/16 of the in-process cache's bytes).
    """
    if kind == "embedding":
        entries, ttl_s = config.embedding_entries, config.embedding_ttl_s
    elif kind in RESPONSE_KINDS:
        entries, ttl_s = config.response_entries, config.response_ttl_s
    else:
        raise ValueError(f"unknown cache kind {kind!r}")
    if entries == 0:
        return None
    max_bytes = config.embedding_bytes if kind == "embedding" else config.response_bytes
    if config.redis_url:
        return RedisCache(
            config.redis_url,
            ttl_s,
            config.redis_timeout_s,
            name=kind,
            max_value_bytes=max_bytes // 16,
        )
    return LocalCache(entries, ttl_s, max_bytes=max_bytes, name=kind)


_TOKENS = struct.Struct("<I")


class EmbeddingCache:
    """Embeddings by text, for one model at one precision.

    The namespace (e.g. "all-MiniLM-L6-v2:bf16") is in every key, so vectors of another model
    or precision are never served. A value is a 4-byte token count then the float32 vector,
    little-endian: 1.5 KB for 384 dimensions, and decoding is a copy, not a parse.
    """

    def __init__(self, cache: Cache, namespace: str) -> None:
        self.cache = cache
        self.namespace = namespace

    def key(self, text: str) -> str:
        # surrogatepass: JSON may carry lone surrogates, which strict UTF-8 refuses.
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return f"rag:emb:{self.namespace}:{digest}"

    async def lookup(self, texts: list[str]) -> list[tuple[np.ndarray, int] | None]:
        """(vector, token count) for each text found, None for the others, in order."""
        keys = [self.key(text) for text in texts]
        unique = list(dict.fromkeys(keys))
        found = dict(zip(unique, await self.cache.get_many(unique), strict=True))
        decoded = {key: _decode_embedding(value) for key, value in found.items()}
        return [decoded[key] for key in keys]

    async def store(self, texts: list[str], vectors: np.ndarray, tokens: list[int]) -> None:
        """Store each text's vector (row) and token count."""
        if len(texts) != len(vectors) or len(texts) != len(tokens):
            raise ValueError("texts, vectors and tokens must have the same length")
        rows = np.asarray(vectors, dtype="<f4")
        items = {
            self.key(text): _TOKENS.pack(count) + row.tobytes()
            for text, row, count in zip(texts, rows, tokens, strict=True)
        }
        await self.cache.set_many(items)

    def snapshot(self) -> dict[str, Any]:
        return self.cache.snapshot()


def _decode_embedding(value: bytes | None) -> tuple[np.ndarray, int] | None:
    # A value of the wrong shape (another writer, a truncated entry) is a miss, not an error.
    if value is None or len(value) <= _TOKENS.size or (len(value) - _TOKENS.size) % 4:
        return None
    (count,) = _TOKENS.unpack_from(value)
    vector = np.frombuffer(value, dtype="<f4", offset=_TOKENS.size).astype(np.float32)
    return vector, count


# Scores may arrive as numpy scalars and metadata with int keys: accepted rather than refused.
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class ResponseCache:
    """Whole search or rerank answers, keyed by the canonical JSON of the request.

    Invalidation is by key, not by deletion: the caller puts the collection's version (bumped
    by every ingest or delete) and the models' names into `namespace`, so a changed collection
    simply stops matching its old entries, which then age out with the TTL.
    """

    def __init__(self, cache: Cache, kind: str) -> None:
        self.cache = cache
        self.kind = kind

    def key(self, namespace: str, request: dict[str, Any]) -> str:
        """The same for equal requests whatever their keys' order; raises TypeError for values
        JSON cannot hold (a caller bug, not a cache failure)."""
        canonical = orjson.dumps(request, option=orjson.OPT_SORT_KEYS | _JSON_OPTIONS)
        return f"rag:{self.kind}:{namespace}:{hashlib.sha256(canonical).hexdigest()}"

    async def get(self, key: str) -> dict[str, Any] | None:
        (value,) = await self.cache.get_many([key])
        if value is None:
            return None
        try:
            answer = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        return answer if isinstance(answer, dict) else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        try:
            encoded = orjson.dumps(value, option=_JSON_OPTIONS)
        except TypeError:
            logger.warning("%s cache: answer not JSON-serializable; not cached", self.kind)
            return
        await self.cache.set_many({key: encoded})

    def snapshot(self) -> dict[str, Any]:
        return self.cache.snapshot()


def _redacted(url: str) -> str:
    """Scheme, host, port and path only: credentials can sit in the user part or the query."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"
