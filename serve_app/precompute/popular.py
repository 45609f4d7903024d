"""Popular queries in the ingress: counted, and answered from precomputed answers in memory.

The ingress counts each search and RAG request it answers or admits (`QueryCounter`), and
holds the valid precomputed answers (`PrecomputedAnswers`); the Precompute job (job.py)
decides which answers to compute, and the ingress computes them at background priority.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app.config import PrecomputeConfig
from serve_app.precompute.answers import PrecomputedAnswers
from serve_app.precompute.counter import QueryCounter
from serve_app.precompute.keys import Asked, ask
from serve_app.precompute.store import Answer, PopularStore
from serve_app.protocol.documents import RetrievalRequest


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
        self.store = store  # where the job's answers are written
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
