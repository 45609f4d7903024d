"""Counting popular requests: in memory in each ingress replica, added to PostgreSQL in batches."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from serve_app.errors import StoreUnavailable
from serve_app.precompute.keys import Asked
from serve_app.precompute.store import PopularStore

logger = logging.getLogger("ray.serve")

MAX_PENDING = 100_000  # distinct requests held while the database is unreachable
# A request larger than this (as canonical JSON) is not counted: popular requests are short,
# and a count row holds the whole request.
MAX_COUNTED_BYTES = 8 * 1024


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
