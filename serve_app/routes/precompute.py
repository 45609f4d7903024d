"""The Precompute deployment: a scheduled job keeping the most asked answers computed.

Every `interval_s` (its `user_config`, a `PrecomputeLive`, changed in place) it ranks the counted
search and RAG requests, drops the answers of requests no longer in the top `top_n`, and
computes again each ranked answer that is missing, stale (its collection changed) or older than
`max_age_s`. It asks the ingress to run each request at background priority
(`Ingress.run_background`): only on a free slot of the route, given up as soon as a client
needs it, so the job never delays a client into a 503. A pass that finds a route busy stops
and tries again a few seconds later. The answers go to PostgreSQL, from where every ingress
replica loads them (serve_app/popular.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig, PrecomputeLive, overlay
from serve_app.errors import StoreUnavailable
from serve_app.store import open_store
from serve_app.store.popular import PopularStore, Ranked

logger = logging.getLogger("ray.serve")

RETRY_S = 5.0  # after a pass that found a route busy
# What a pass reports: requests ranked, of those already fresh, computed, given up because a
# route was busy (or a client took the slot), failed; answers pruned; store outages.
PASS_COUNTS = ("ranked", "fresh", "computed", "busy", "failed", "pruned", "store_unavailable")


@serve.deployment(num_replicas=1, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.05})
class Precompute:
    async def __init__(self, config: AppConfig) -> None:
        store = config.store.model_copy(update={"pool_size": 2})
        self.store = PopularStore(await open_store(store, "Precompute"))
        self.defaults = self.schedule = config.precompute.schedule
        self.ingress: DeploymentHandle | None = None
        self.wake = asyncio.Event()
        self.running = asyncio.Lock()
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
        async with self.running:
            started, outcome = time.time(), Counter()
            schedule = self.schedule
            try:
                ranked = await self.store.ranked(
                    list(schedule.kinds), schedule.top_n, schedule.min_count, schedule.window_s
                )
                outcome["pruned"] = await self.store.prune(ranked, schedule.window_s)
                outcome["ranked"] = len(ranked)
                for entry in ranked:
                    if not self._stale(entry, schedule):
                        outcome["fresh"] += 1
                        continue
                    result = await self._compute(entry)
                    outcome[result] += 1
                    if result == "busy":
                        break  # the routes are in use: try again shortly
            except StoreUnavailable:
                outcome["store_unavailable"] += 1
            self.totals.update(outcome)
            self.last = {
                "started_at": started,
                "duration_s": round(time.time() - started, 3),
                **{k: outcome[k] for k in PASS_COUNTS},
            }
            return self.last

    @staticmethod
    def _stale(entry: Ranked, schedule: PrecomputeLive) -> bool:
        return (
            entry.answer_version != entry.version
            or entry.answer_age_s is None
            or entry.answer_age_s > schedule.max_age_s
        )

    async def _compute(self, entry: Ranked) -> str:
        """ "computed", "busy" (no free slot, or a client took it) or "failed"."""
        ingress = await self._ingress()
        request = {**entry.request, "collection": entry.collection}
        try:
            body = await ingress.run_background.remote(entry.kind, request)
        except Exception as exc:  # a request that fails now (say, a removed model) is skipped
            logger.warning("Precompute: %s request failed: %s", entry.kind, type(exc).__name__)
            return "failed"
        if body is None:
            return "busy"
        # Stored for the version read before computing: if the collection changed meanwhile,
        # the answer is already stale and is never served.
        await self.store.put(entry, body)
        return "computed"

    async def _ingress(self) -> DeploymentHandle:
        if self.ingress is None:
            app = serve.get_replica_context().app_name
            # A blocking call to the controller: off the event loop.
            self.ingress = await asyncio.to_thread(serve.get_deployment_handle, "Ingress", app)
        return self.ingress
