"""Batching helpers shared by the model deployments.

`@serve.batch` counts a batch with `batch_size_fn`; here a batch is counted in items
(sentences, pairs), not requests, so one 32-sentence request and 32 one-sentence requests
fill a batch alike. Requests larger than a batch are split before they are queued.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve_app.metrics import batch_sizes


def count_items(requests: Sequence[Sequence[object]]) -> int:
    """`batch_size_fn`: the number of items in a batch of multi-item requests."""
    return sum(len(r) for r in requests)


def split(items: Sequence, size: int) -> list[Sequence]:
    """`items` in consecutive pieces of at most `size`, each small enough for one batch."""
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


def unflatten(flat: Sequence, requests: Sequence[Sequence[object]]) -> list[list]:
    """Split a flat batch result back into one list per request, in order."""
    out, start = [], 0
    for r in requests:
        out.append(list(flat[start : start + len(r)]))
        start += len(r)
    return out


@dataclass
class BatchStats:
    """Executed batch sizes of one deployment, so batching is measured rather than assumed."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    max_items: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, requests: int, items: int) -> None:
        with self._lock:
            self.batches += 1
            self.requests += requests
            self.items += items
            self.max_items = max(self.max_items, items)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "items": self.items,
                "max_items": self.max_items,
                "mean_items": self.items / self.batches if self.batches else 0.0,
                "mean_requests": self.requests / self.batches if self.batches else 0.0,
            }


class BatchedModel:
    """What the three model deployments share: live batch settings and a `model_info` report.

    Subclasses set `batched` to the name of their `@serve.batch` method and fill `info` after
    loading their model.
    """

    batched: str
    max_batch_size: int  # set by reconfigure, which Serve calls before the first request

    def __init__(self) -> None:
        self.stats = BatchStats()
        self.info: dict[str, object] = {}

    def record_batch(self, requests: int, items: int) -> None:
        """One executed batch: into the counters of `model_info` and the batch-size histogram."""
        self.stats.record(requests, items)
        batch_sizes().observe(items, tags={"deployment": type(self).__name__})

    def reconfigure(self, user_config: dict) -> None:
        """Apply `user_config` (a `Batching`) to the running batcher, without a restart."""
        from serve_app.config import Batching

        batching = Batching.model_validate(user_config)
        method = getattr(self, self.batched)
        method.set_max_batch_size(batching.max_batch_size)
        method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.max_batch_size = batching.max_batch_size
        self.info["batching"] = batching.model_dump()

    def model_info(self) -> dict[str, object]:
        """Model, precision, device, memory and the executed batch sizes so far."""
        return {**self.info, "memory": self.memory(), "batches": self.stats.snapshot()}

    def memory(self) -> dict[str, int]:
        raise NotImplementedError
