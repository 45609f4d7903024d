"""Popular queries in the ingress: counted, and answered from precomputed answers in memory.

Every search and RAG request is reduced to a key: its parameters with the query normalized
(Unicode NFKC, case-folded, whitespace collapsed) and the names of the models that answer it.
The ingress counts keys in memory and adds them to PostgreSQL in batches (`QueryCounter`);
the Precompute deployment (serve_app/routes/precompute.py) computes answers for the most asked
keys and stores them. Each ingress replica holds the valid answers in memory
(`PrecomputedAnswers`), kept current by PostgreSQL notifications: a change to a collection
drops its answers on every replica as its transaction commits, and a new answer is loaded as
soon as it is stored. While the notification connection is down nothing is answered from
memory, since a change might have been missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import unicodedata
from collections import Counter
from typing import Any

import orjson
import psycopg

from serve_app import metrics
from serve_app.cluster import client_name
from serve_app.config import PrecomputeConfig
from serve_app.errors import StoreUnavailable
from serve_app.protocol.documents import RetrievalRequest
from serve_app.store.popular import Answer, Asked, PopularStore
from serve_app.store.schema import connect_timeout

logger = logging.getLogger("ray.serve")

CHANNELS = ("rag_collections", "rag_precomputed")
# The notification connection is idle for long stretches: TCP keepalives (libpq's) find a
# peer that vanished without a word (a host lost, a NAT entry expired) in about 25 s, and a
# `SELECT 1` at least every LIVENESS_S, bounded by the store's timeout, covers the rest.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
LIVENESS_S = 10.0
MAX_PENDING = 100_000  # distinct requests held while the database is unreachable
# A request larger than this (as canonical JSON) is not counted: popular requests are short,
# and a count row holds the whole request.
MAX_COUNTED_BYTES = 8 * 1024
# Precomputed answers held in memory by each ingress: one answer (a search of top_k results,
# each with its document's metadata) at most ANSWER_BYTES, all of them at most MEMORY_BYTES.
# Answers over the first are answered by their route, as if not precomputed.
ANSWER_BYTES = 1 * 2**20
MEMORY_BYTES = 64 * 2**20


def normalize(query: str) -> str:
    """The form in which queries are counted and matched: "What is  HNSW?" == "what is hnsw?"."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


def ask(kind: str, request: RetrievalRequest, models: str) -> Asked:
    """The counted form of a search or RAG request; `models` names the models answering it,
    so answers of other models never match."""
    asked = request.model_dump(mode="json", exclude={"collection", "stream"})
    query = normalize(request.query)
    canonical = orjson.dumps(
        {**asked, "query": query, "kind": kind, "models": models}, option=orjson.OPT_SORT_KEYS
    )
    key = hashlib.sha256(canonical).hexdigest()
    return Asked(request.collection, kind, key, query, asked, size=len(canonical))


class QueryCounter:
    """Counts in memory, added to PostgreSQL every `flush_interval_s` in one batch.

    Counts are statistics: those of a flush that fails are kept for the next one (up to
    `MAX_PENDING` distinct requests) and those of a replica that dies are lost.
    """

    def __init__(self, store: PopularStore, flush_interval_s: float) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.pending: Counter[Asked] = Counter()
        self.written = 0
        self.refused = 0  # distinct requests whose rows the store refused

    def count(self, asked: Asked, times: int = 1) -> None:
        if asked.size > MAX_COUNTED_BYTES:
            return
        if asked in self.pending or len(self.pending) < MAX_PENDING:
            self.pending[asked] += times

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # counting must outlive any one failure
                logger.exception("Writing query counts failed; those counts are dropped")

    async def flush(self) -> None:
        batch, self.pending = self.pending, Counter()
        try:
            refused = await self.store.record(list(batch.items()))
            self.written += sum(batch.values()) - sum(batch[asked] for asked in refused)
            self.refused += len(refused)
            if refused:
                logger.warning("Query counts: %d request(s) refused by the store", len(refused))
        except StoreUnavailable:
            for asked, times in batch.items():  # kept for the next flush
                self.count(asked, times)


class PrecomputedAnswers:
    """The valid precomputed answers, in memory, following the database's notifications."""

    def __init__(
        self,
        url: str,
        store: PopularStore,
        reconnect_s: float = 1.0,
        answer_bytes: int = ANSWER_BYTES,
        memory_bytes: int = MEMORY_BYTES,
        timeout_s: float = 5.0,
        versions_check_s: float = 30.0,
        liveness_s: float = LIVENESS_S,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.versions_check_s = versions_check_s
        self.liveness_s = liveness_s
        self.store = store
        self.reconnect_s = reconnect_s
        self.answer_bytes = answer_bytes
        self.memory_bytes = memory_bytes
        self.entries: dict[tuple[str, str, str], Answer] = {}  # (collection, kind, key)
        self.sizes: dict[tuple[str, str, str], int] = {}  # bytes of each entry's body
        self.skipped = 0  # answers not held: too large, no room, or not writable as JSON
        self.subscribed = False
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()

    def get(self, asked: Asked) -> Answer | None:
        """The valid answer, if any; none while a change might have been missed."""
        key = (asked.collection, asked.kind, asked.key)
        answer = self.entries.get(key) if self.subscribed else None
        outcome = "hits" if answer else "misses"
        getattr(self, outcome)[asked.kind] += 1
        recorded = metrics.cache_metrics()
        counter = recorded.hits if answer else recorded.misses
        counter.inc(tags={"cache": f"precomputed-{asked.kind}"})
        return answer

    def forget(self, collection: str) -> None:
        """Drop a collection's answers now: this replica changed it. (Other replicas drop them
        on the notification, which arrives as the change commits.)"""
        for key in [k for k in self.entries if k[0] == collection]:
            self._drop(key)

    def hold(self, answer: Answer) -> bool:
        """Keep `answer` in memory if it fits the bounds and can be written as JSON (a value
        stored before today's validation might not be): else it is answered by its route."""
        key = (answer.collection, answer.kind, answer.key)
        self._drop(key)
        try:
            size = len(orjson.dumps(answer.body))
        except TypeError:
            size = None
        if size is None or size > self.answer_bytes or self.held_bytes + size > self.memory_bytes:
            self.skipped += 1
            return False
        self.entries[key], self.sizes[key] = answer, size
        return True

    @property
    def held_bytes(self) -> int:
        return sum(self.sizes.values())

    def _drop(self, key: tuple[str, str, str]) -> None:
        self.entries.pop(key, None)
        self.sizes.pop(key, None)

    def report(self) -> dict[str, Any]:
        kinds = ("search", "rag")
        return {
            "subscribed": self.subscribed,
            "answers": {k: sum(key[1] == k for key in self.entries) for k in kinds},
            "answers_bytes": self.held_bytes,
            "answers_skipped": self.skipped,
            "hits": {k: self.hits[k] for k in kinds},
            "misses": {k: self.misses[k] for k in kinds},
        }

    async def run(self) -> None:
        """Follow the notifications for as long as the replica lives, reconnecting as needed."""
        while True:
            try:
                await self._follow()
            except (psycopg.Error, StoreUnavailable, OSError) as exc:
                logger.warning("Precomputed answers paused: %s; retrying", type(exc).__name__)
            except Exception:
                logger.exception("Precomputed answers paused; retrying")
            finally:
                self.subscribed = False
                self.entries.clear()
                self.sizes.clear()
            await asyncio.sleep(self.reconnect_s)

    async def _follow(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=connect_timeout(self.timeout_s),
            application_name=client_name("Ingress-listen"),
            **KEEPALIVES,
        )
        async with conn:
            for channel in CHANNELS:
                await conn.execute(f"LISTEN {channel}")
            # Listening before loading: a change made during the load is still notified.
            self.entries.clear()
            self.sizes.clear()
            for answer in await self.store.answers():
                self.hold(answer)
            self.subscribed = True
            logger.info("Precomputed answers: %d loaded, following changes", len(self.entries))
            checked = time.monotonic()
            wait_s = min(self.liveness_s, self.versions_check_s)
            while True:
                async for notify in conn.notifies(timeout=wait_s):
                    await self._apply(notify.channel, notify.payload)
                await self._check_alive(conn)
                if time.monotonic() - checked >= self.versions_check_s:
                    await self.recheck()
                    checked = time.monotonic()

    async def _check_alive(self, conn: psycopg.AsyncConnection) -> None:
        """A connection lost in silence shows here: `SELECT 1` within `timeout_s`, else
        answering from memory stops at once and the connection is dropped. (Unbounded, a dead
        link held this until the kernel gave up on it, many minutes; cancelled, psycopg first
        spends seconds trying to cancel the query over that link.)"""
        check = asyncio.ensure_future(conn.execute("SELECT 1"))
        done, _ = await asyncio.wait({check}, timeout=self.timeout_s)
        if not done:
            self.subscribed = False
            check.cancel()
            raise TimeoutError("the notification connection stopped answering")
        check.result()

    async def recheck(self) -> None:
        """Drop the answers whose collection is gone or at another version: a change whose
        notification never arrived stops being served within `versions_check_s`."""
        versions = await self.store.store.versions()
        for k in [k for k, a in self.entries.items() if versions.get(a.collection_id) != a.version]:
            self._drop(k)

    async def _apply(self, channel: str, payload: str) -> None:
        if channel == "rag_collections":
            collection_id, version = (int(part) for part in payload.split(":"))
            stale = [k for k, a in self.entries.items() if a.collection_id == collection_id]
            for k in stale:
                if self.entries[k].version != version:
                    self._drop(k)
            return
        collection_id, kind, key = payload.split(":", 2)
        answer = await self.store.answer(int(collection_id), kind, key)
        stale = [
            k
            for k, a in self.entries.items()
            if (a.collection_id, a.kind, a.key) == (int(collection_id), kind, key)
        ]
        for k in stale:
            self._drop(k)
        if answer is not None:
            self.hold(answer)


class Popular:
    """What the ingress holds: the counter, the answers in memory, and their tasks."""

    def __init__(
        self,
        store: PopularStore,
        url: str,
        config: PrecomputeConfig,
        models: str,
        timeout_s: float = 5.0,  # the store's: bounds the notification link's checks
    ):
        self.config = config
        self.models = models
        self.counter = QueryCounter(store, config.flush_interval_s)
        self.answers = PrecomputedAnswers(
            url,
            store,
            timeout_s=timeout_s,
            versions_check_s=config.versions_check_s,
        )
        loop = asyncio.get_running_loop()
        self.tasks = []
        if config.count_queries:
            self.tasks.append(loop.create_task(self.counter.run()))
        if config.serve_precomputed:
            self.tasks.append(loop.create_task(self.answers.run()))

    def ask(self, kind: str, request: RetrievalRequest) -> Asked:
        return ask(kind, request, self.models)

    def lookup(self, asked: Asked) -> Answer | None:
        """The precomputed answer, if one is valid now; a request so answered is counted."""
        answer = self.answers.get(asked) if self.config.serve_precomputed else None
        if answer is not None:
            self.count(asked)
        return answer

    def count(self, asked: Asked) -> None:
        """Count a request the ingress admitted (one refused for overload is not counted: a
        flood of refused requests would otherwise rank as popular)."""
        if self.config.count_queries:
            self.counter.count(asked)

    def report(self) -> dict[str, Any]:
        return {
            **self.answers.report(),
            "counts_pending": sum(self.counter.pending.values()),
            "counts_written": self.counter.written,
            "counts_refused": self.counter.refused,
        }
