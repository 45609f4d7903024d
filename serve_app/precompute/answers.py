"""The valid precomputed answers, held in memory by each ingress replica.

Kept current by PostgreSQL notifications (LISTEN/NOTIFY): a change to a collection drops its
answers on every replica as its transaction commits, and a new answer is loaded as soon as it
is stored. While the notification connection is down nothing is answered from memory, since a
change might have been missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import orjson
import psycopg

from serve_app import metrics
from serve_app.cluster import client_name
from serve_app.errors import StoreUnavailable
from serve_app.precompute.keys import Asked
from serve_app.precompute.store import Answer, PopularStore
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
# Precomputed answers held in memory by each ingress: one answer (a search of top_k results,
# each with its document's metadata) at most ANSWER_BYTES, all of them at most MEMORY_BYTES.
# Answers over the first are answered by their route, as if not precomputed.
ANSWER_BYTES = 1 * 2**20
MEMORY_BYTES = 64 * 2**20


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
