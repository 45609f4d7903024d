"""The Precompute deployment: a scheduled job keeping the most asked answers computed.

Every `interval_s` (its `user_config`, a `PrecomputeLive`, changed in place) a pass ranks the
counted search and RAG requests, drops the answers of requests no longer in the top `top_n`,
and has each ranked answer that is missing, stale (its collection changed) or older than
`max_age_s` computed again.

The job decides; the ingress computes. Each ingress replica asks for work (`take`, a long
poll); the first to ask when a pass is due gets its stale requests (`work.Work`), runs them
at background priority (only on a free slot of the route, given up as soon as a client needs
it, so the job never delays a client into a 503), stores the answers and reports back
(`finish`). A pass that found a route busy is tried again a few seconds later. The answers go
to PostgreSQL, from where every ingress replica loads them (answers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from typing import Any

from ray import serve

from serve_app.config import AppConfig, PrecomputeLive, overlay
from serve_app.errors import StoreUnavailable
from serve_app.precompute.store import PopularStore, Ranked
from serve_app.precompute.work import Work
from serve_app.store import open_store

logger = logging.getLogger("ray.serve")

RETRY_S = 5.0  # after a pass that found a route busy
# A pass whose ingress replica never reports (it died) is given up after this long.
LEASE_S = 600.0
# What a pass reports: requests ranked, of those already fresh, computed, given up because a
# route was busy (or a client took the slot), failed; answers pruned; store outages.
PASS_COUNTS = ("ranked", "fresh", "computed", "busy", "failed", "pruned", "store_unavailable")


# One replica: the schedule is one. Room for a long poll of every ingress replica.
@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.05})
class Precompute:
    async def __init__(self, config: AppConfig) -> None:
        store = config.store.model_copy(update={"pool_size": 2})
        self.store = PopularStore(await open_store(store, "Precompute"))
        self.defaults = config.precompute.schedule
        # Serve calls reconfigure only with a user_config: the same rule applies without one.
        self.schedule = overlay(self.defaults, {})
        self.wake = asyncio.Event()
        self.running = asyncio.Lock()
        self.due = asyncio.Event()  # a pass waits for an ingress replica to take it
        self.numbers = itertools.count(1)
        self.current: _Pass | None = None
        self.last: dict[str, Any] = {}
        self.totals: Counter[str] = Counter()
        self.loop = asyncio.get_running_loop().create_task(self._schedule())

    def reconfigure(self, user_config: dict) -> None:
        """The schedule: `user_config` laid over `args.precompute.schedule`, field by field."""
        self.schedule = overlay(self.defaults, user_config)
        self.wake.set()  # a new interval takes effect now, not after the old one

    async def run(self) -> dict[str, Any]:
        """One pass now (operators and tests); the schedule goes on as before."""
        return await self._pass()

    def report(self) -> dict[str, Any]:
        return {**self.schedule.model_dump(), "last_pass": self.last, "totals": dict(self.totals)}

    async def take(self, wait_s: float = 10.0) -> Work | None:
        """The work of the pass now due, for the ingress replica that asks first; None when
        no pass is due within `wait_s`, or it needs no computing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.due.wait(), wait_s)
        current = self.current
        if not self.due.is_set() or current is None or current.taken:
            return None
        self.due.clear()
        current.taken = True  # before any await: one taker
        schedule = self.schedule
        try:
            ranked = await self.store.ranked(
                list(schedule.kinds), schedule.top_n, schedule.min_count, schedule.window_s
            )
            current.outcome["pruned"] = await self.store.prune(ranked, schedule.window_s)
        except StoreUnavailable:
            current.outcome["store_unavailable"] += 1
            current.end()
            return None
        stale = [entry for entry in ranked if self._stale(entry, schedule)]
        current.outcome["ranked"] = len(ranked)
        current.outcome["fresh"] = len(ranked) - len(stale)
        if not stale:
            current.end()
            return None
        return Work(current.number, stale)

    def finish(self, number: int, outcome: dict[str, int]) -> None:
        """An ingress replica computed pass `number`'s work: `outcome` counts how."""
        current = self.current
        if current is not None and current.number == number:
            current.outcome.update(outcome)
            current.end()

    async def _schedule(self) -> None:
        wait = self.schedule.interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)
            self.wake.clear()
            wait = self.schedule.interval_s
            if not self.schedule.enabled:
                continue
            try:
                outcome = await self._pass()
            except Exception:  # the job must outlive any one failure
                logger.exception("Precompute pass failed")
                continue
            if outcome["busy"]:
                wait = min(wait, RETRY_S)

    async def _pass(self) -> dict[str, Any]:
        """Offer a pass to the ingress replicas and wait until one has computed it."""
        async with self.running:
            started = time.time()
            self.current = current = _Pass(next(self.numbers))
            self.due.set()
            try:
                await asyncio.wait_for(current.ended.wait(), LEASE_S)
            except TimeoutError:
                logger.warning("Precompute: pass %d was not computed in time", current.number)
            finally:
                self.due.clear()
                self.current = None
            self.totals.update(current.outcome)
            self.last = {
                "started_at": started,
                "duration_s": round(time.time() - started, 3),
                **{k: current.outcome[k] for k in PASS_COUNTS},
            }
            return self.last

    @staticmethod
    def _stale(entry: Ranked, schedule: PrecomputeLive) -> bool:
        return (
            entry.answer_version != entry.version
            or entry.answer_age_s is None
            or entry.answer_age_s > schedule.max_age_s
        )


class _Pass:
    """A pass in progress: taken by one ingress replica, ended when it reports."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.taken = False
        self.outcome: Counter[str] = Counter()
        self.ended = asyncio.Event()

    def end(self) -> None:
        self.ended.set()
