"""The batching arithmetic of the model deployments. No Ray here: `deployments/batching.py`
applies it to `@serve.batch`.

A batch is bounded in items (sentences, pairs) and in tokens: `@serve.batch` counts a batch
with `batch_size_fn`, and here each queued piece of a request costs
`max(items, tokens * max_batch_size / max_batch_tokens)` units of `max_batch_size`. A batch
within `max_batch_size` units therefore holds at most `max_batch_size` items and at most
`max_batch_tokens` tokens, so a few long inputs make a small batch and many short ones a full
one. Requests larger than a batch are split into pieces before they are queued.

On a GPU the forward passes inside a batch are sized from free device memory as well
(`ForwardBudget`), so a large batch cannot run the device out of memory.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


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
