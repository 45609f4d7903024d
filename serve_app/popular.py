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
import unicodedata
from collections import Counter
from typing import Any

import orjson
import psycopg

from serve_app import metrics
from serve_app.cluster import client_name
from serve_app.config import PrecomputeConfig
from serve_app.protocol.documents import RetrievalRequest
from serve_app.store.popular import Answer, Asked, PopularStore
from serve_app.store.vector_store import StoreUnavailable

logger = logging.getLogger("ray.serve")

CHANNELS = ("rag_collections", "rag_precomputed")
MAX_PENDING = 100_000  # distinct requests held while the database is unreachable


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
    return Asked(request.collection, kind, key, query, asked)


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

    def count(self, asked: Asked, times: int = 1) -> None:
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
            await self.store.record(list(batch.items()))
            self.written += sum(batch.values())
        except StoreUnavailable:
            for asked, times in batch.items():  # kept for the next flush
                self.count(asked, times)


class PrecomputedAnswers:
    """The valid precomputed answers, in memory, following the database's notifications."""

    def __init__(self, url: str, store: PopularStore, reconnect_s: float = 1.0) -> None:
        self.url = url
        self.store = store
        self.reconnect_s = reconnect_s
        self.entries: dict[tuple[str, str, str], Answer] = {}  # (collection, kind, key)
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
            del self.entries[key]

    def report(self) -> dict[str, Any]:
        kinds = ("search", "rag")
        return {
            "subscribed": self.subscribed,
            "answers": {k: sum(key[1] == k for key in self.entries) for k in kinds},
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
            await asyncio.sleep(self.reconnect_s)

    async def _follow(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=5,
            application_name=client_name("Ingress-listen"),
        )
        async with conn:
            for channel in CHANNELS:
                await conn.execute(f"LISTEN {channel}")
            # Listening before loading: a change made during the load is still notified.
            self.entries = {(a.collection, a.kind, a.key): a for a in await self.store.answers()}
            self.subscribed = True
            logger.info("Precomputed answers: %d loaded, following changes", len(self.entries))
            while True:
                async for notify in conn.notifies(timeout=10.0):
                    await self._apply(notify.channel, notify.payload)
                await conn.execute("SELECT 1")  # a connection lost in silence shows here

    async def _apply(self, channel: str, payload: str) -> None:
        if channel == "rag_collections":
            collection_id, version = (int(part) for part in payload.split(":"))
            stale = [k for k, a in self.entries.items() if a.collection_id == collection_id]
            for k in stale:
                if self.entries[k].version != version:
                    del self.entries[k]
            return
        collection_id, kind, key = payload.split(":", 2)
        answer = await self.store.answer(int(collection_id), kind, key)
        stale = [
            k
            for k, a in self.entries.items()
            if (a.collection_id, a.kind, a.key) == (int(collection_id), kind, key)
        ]
        for k in stale:
            del self.entries[k]
        if answer is not None:
            self.entries[(answer.collection, answer.kind, answer.key)] = answer


class Popular:
    """What the ingress holds: the counter, the answers in memory, and their tasks."""

    def __init__(self, store: PopularStore, url: str, config: PrecomputeConfig, models: str):
        self.config = config
        self.models = models
        self.counter = QueryCounter(store, config.flush_interval_s)
        self.answers = PrecomputedAnswers(url, store)
        loop = asyncio.get_running_loop()
        self.tasks = []
        if config.count_queries:
            self.tasks.append(loop.create_task(self.counter.run()))
        if config.serve_precomputed:
            self.tasks.append(loop.create_task(self.answers.run()))

    def lookup(self, kind: str, request: RetrievalRequest) -> Answer | None:
        """Count the request; its precomputed answer, if one is valid now."""
        asked = ask(kind, request, self.models)
        if self.config.count_queries:
            self.counter.count(asked)
        return self.answers.get(asked) if self.config.serve_precomputed else None

    def report(self) -> dict[str, Any]:
        return {
            **self.answers.report(),
            "counts_pending": sum(self.counter.pending.values()),
            "counts_written": self.counter.written,
        }
