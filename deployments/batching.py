"""Batching helpers shared by the model deployments.

A batch is bounded in items (sentences, pairs) and in tokens: `@serve.batch` counts a batch
with `batch_size_fn`, and here each queued piece of a request costs
`max(items, tokens * max_batch_size / max_batch_tokens)` units of `max_batch_size`. A batch
within `max_batch_size` units therefore holds at most `max_batch_size` items and at most
`max_batch_tokens` tokens, so a few long inputs make a small batch and many short ones a full
one. Requests larger than a batch are split into pieces before they are queued.

On a GPU the forward passes inside a batch are sized from free device memory as well
(`ForwardBudget`), so a large batch cannot run the device out of memory.

A batch that fails is run again piece by piece (`isolate`), so one bad request fails alone and
the others in its batch are answered.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from serve_app.cache import EmbeddingCache, ResponseCache
from serve_app.config import ModelLive
from serve_app.metrics import batch_sizes

T = TypeVar("T")
R = TypeVar("R")
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Piece(Generic[T]):
    """Part of one request, small enough for one batch, with its size in batch units."""

    items: Sequence[T]
    tokens: Sequence[int]  # per item, as the model will read it (after truncation)
    cost: int
    model: Any = None  # the loaded model its request is served by, where that can change

    def __len__(self) -> int:
        return len(self.items)


def batch_cost(pieces: Sequence[Piece]) -> int:
    """`batch_size_fn`: a batch's size in units of `max_batch_size`."""
    return sum(p.cost for p in pieces)


def split(
    items: Sequence[T], tokens: Sequence[int], max_items: int, max_tokens: int
) -> list[Piece[T]]:
    """`items` in consecutive pieces of at most `max_items` items and `max_tokens` tokens
    (an item longer than `max_tokens` alone is a piece of cost `max_items`)."""
    pieces, start = [], 0
    while start < len(items) or not pieces:
        end, total = start, 0
        while end < len(items) and end - start < max_items:
            if end > start and total + tokens[end] > max_tokens:
                break
            total += tokens[end]
            end += 1
        scaled = math.ceil(total * max_items / max_tokens)
        cost = min(max_items, max(end - start, scaled, 1))
        pieces.append(Piece(items[start:end], tokens[start:end], cost))
        start = end
    return pieces


@dataclass
class ForwardBudget:
    """Items per forward pass: fixed on CPU; on CUDA also what half the free memory holds.

    `bytes_per_token` is measured once, at warm-up, from the peak memory of a forward pass.
    """

    per_forward: int
    device: str = "cpu"
    bytes_per_token: float | None = None
    free_memory: Callable[[], int] = field(default=lambda: torch.cuda.mem_get_info()[0])

    def items(self, longest_tokens: int) -> int:
        if self.device != "cuda" or not self.bytes_per_token:
            return self.per_forward
        fits = int(self.free_memory() * 0.5 / (self.bytes_per_token * max(1, longest_tokens)))
        return max(1, min(self.per_forward, fits))

    def measure(self, forward: Callable[[], int]) -> None:
        """Run `forward` (returning the tokens it processed) and keep its bytes per token."""
        if self.device != "cuda":
            return
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tokens = forward()
        torch.cuda.synchronize()
        self.bytes_per_token = max(1.0, (torch.cuda.max_memory_allocated() - before) / tokens)


async def isolate(
    pieces: Sequence[Piece[T]], run: Callable[[Sequence[Piece[T]]], Awaitable[list[R]]]
) -> list[R | Exception]:
    """`run(pieces)`: one result per piece. If the batch fails, each piece runs alone, and a
    piece that fails alone gets its exception as its result (`@serve.batch` hands results,
    exceptions included, to their callers as they are; `unwrap` raises them there)."""
    try:
        return list(await run(pieces))
    except Exception as exc:
        if len(pieces) == 1:
            raise
        logger.warning("A batch of %d failed (%r); retrying its pieces alone", len(pieces), exc)
    results: list[R | Exception] = []
    for piece in pieces:
        try:
            results.extend(await run([piece]))
        except Exception as exc:
            results.append(exc)
    return results


def unwrap(results: Sequence[R | Exception]) -> list[R]:
    """Results of a request's pieces, raising the first that failed."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return list(results)  # type: ignore[arg-type]


def unflatten(flat: Sequence, requests: Sequence[Sized]) -> list[list]:
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
    max_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, requests: int, items: int, tokens: int = 0) -> None:
        with self._lock:
            self.batches += 1
            self.requests += requests
            self.items += items
            self.max_items = max(self.max_items, items)
            self.max_tokens = max(self.max_tokens, tokens)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "items": self.items,
                "max_items": self.max_items,
                "max_tokens": self.max_tokens,
                "mean_items": self.items / self.batches if self.batches else 0.0,
                "mean_requests": self.requests / self.batches if self.batches else 0.0,
            }


class BatchedModel:
    """What the three model deployments share: live batch settings and a `model_info` report.

    Subclasses set `batched` to the names of their `@serve.batch` methods (the settings apply
    to each) and fill `info` after loading their model.
    """

    batched: tuple[str, ...]
    cache: EmbeddingCache | ResponseCache | None = None  # set by models that cache
    # Set by reconfigure, which Serve calls before the first request.
    max_batch_size: int
    max_batch_tokens: int

    def pieces(self, items: Sequence[T], tokens: Sequence[int]) -> list[Piece[T]]:
        """`items` split into pieces that fit one batch under the current settings."""
        # One item, however long, must fit: the token bound never goes under the longest.
        max_tokens = max(self.max_batch_tokens, *tokens, 1)
        return split(items, tokens, self.max_batch_size, max_tokens)

    def __init__(self) -> None:
        self.stats = BatchStats()
        self.info: dict[str, object] = {}
        self.started = time.perf_counter()

    def loaded(self) -> None:
        """Called at the end of a subclass's __init__: loading and warm-up are done."""
        self.info["load_s"] = round(time.perf_counter() - self.started, 2)

    def record_batch(self, requests: int, items: int, tokens: int = 0) -> None:
        """One executed batch: into the counters of `model_info` and the batch-size histogram."""
        self.stats.record(requests, items, tokens)
        batch_sizes().observe(items, tags={"deployment": type(self).__name__})

    def reconfigure(self, user_config: dict) -> None:
        """Apply `user_config` to the running batcher, without a restart. Only the Embedder
        switches model or precision live; here they need a change of `args` (a restart)."""
        settings = self.apply_batching(user_config)
        if settings.model is not None or settings.precision is not None:
            raise ValueError(
                f"{type(self).__name__} cannot switch model or precision live: set them in "
                "the application's args (which restarts its replicas)"
            )

    def apply_batching(self, user_config: dict) -> ModelLive:
        """The batch settings of `user_config` (a `ModelLive`), in effect from now on."""
        from serve_app.config import Batching

        settings = ModelLive.model_validate(user_config)
        for name in self.batched:
            method = getattr(self, name)
            method.set_max_batch_size(settings.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.max_batch_size = settings.max_batch_size
        self.max_batch_tokens = settings.max_batch_tokens
        self.info["batching"] = Batching.model_validate(
            settings.model_dump(include=set(Batching.model_fields))
        ).model_dump()
        return settings

    def model_info(self) -> dict[str, object]:
        """Model, precision, device, memory and the executed batch sizes so far."""
        cache = self.cache.snapshot() if self.cache else None
        return {
            **self.info,
            "memory": self.memory(),
            "batches": self.stats.snapshot(),
            "cache": cache,
        }

    def memory(self) -> dict[str, int]:
        raise NotImplementedError
