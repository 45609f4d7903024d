"""One pass of the Precompute job, as the ingress computes it.

The job (job.py) ranks the counted requests and hands the stale ones to an ingress replica as
a `Work`; the ingress runs each at background priority, stores each answer, and reports how
the pass went. A pass stops at the first request whose route is busy (no free slot, or a client
took it), so the job never delays a client.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from serve_app.errors import StoreUnavailable
from serve_app.precompute.store import PopularStore, Ranked

logger = logging.getLogger("ray.serve")

# Runs one request (kind, request) at background priority: its answer, or None when busy.
Compute = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class Work:
    """The requests of pass `number` whose answers are missing, stale or too old."""

    number: int
    entries: list[Ranked]


async def work_through(work: Work, compute: Compute, store: PopularStore) -> dict[str, int]:
    """Compute and store each answer in rank order: counts of "computed", "busy" (the pass
    stopped there), "failed" (a request that fails now, say of a removed model, is skipped)
    and "store_unavailable"."""
    outcome: Counter[str] = Counter()
    for entry in work.entries:
        request = {**entry.request, "collection": entry.collection}
        try:
            body = await compute(entry.kind, request)
        except Exception as exc:
            logger.warning("Precompute: %s request failed: %s", entry.kind, type(exc).__name__)
            outcome["failed"] += 1
            continue
        if body is None:
            outcome["busy"] += 1
            break  # the routes are in use: the job tries again shortly
        try:
            # Stored for the version read before computing: if the collection changed
            # meanwhile, the answer is already stale and is never served.
            await store.put(entry, body)
        except StoreUnavailable:
            outcome["store_unavailable"] += 1
            break
        outcome["computed"] += 1
    return dict(outcome)
