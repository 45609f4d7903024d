"""The embedder's bulk lane starts no forward pass while a query is being embedded."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np

from deployments import embedder as embedder_module
from deployments.embedder import Embedder
from deployments.engines.batching import ForwardBudget


def bulk_replica(passes: list[tuple[float, list[str]]]) -> Embedder:
    """An Embedder without a model: `_encode` records when each pass ran, and what it held."""
    replica = object.__new__(Embedder.func_or_class)
    replica.queries = 0
    replica.no_queries = asyncio.Event()
    replica.no_queries.set()

    def encode(texts: list[str], longest: int, loaded) -> np.ndarray:
        passes.append((time.monotonic(), list(texts)))
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    replica._encode = encode
    return replica


def test_bulk_passes_wait_for_queries_and_keep_input_order(monkeypatch):
    monkeypatch.setattr(embedder_module, "BULK_YIELD_S", 5.0)
    passes: list[tuple[float, list[str]]] = []
    replica = bulk_replica(passes)
    loaded = SimpleNamespace(budget=ForwardBudget(per_forward=2), dimensions=2)
    texts = ["ccc", "a", "bbbb", "dd", "e"]

    async def scenario() -> tuple[np.ndarray, float]:
        replica.no_queries.clear()  # a query is being embedded
        bulk = asyncio.create_task(replica._encode_yielding(texts, [3, 1, 4, 2, 1], loaded))
        await asyncio.sleep(0.3)
        assert not passes  # no bulk pass started meanwhile
        released = time.monotonic()
        replica.no_queries.set()
        return await bulk, released

    vectors, released = asyncio.run(scenario())
    assert all(at >= released for at, _ in passes)
    # Passes of at most 2, shortest first; the vectors come back in the input's order.
    assert [p for _, p in passes] == [["a", "e"], ["dd", "ccc"], ["bbbb"]]
    assert vectors[:, 0].tolist() == [3.0, 1.0, 4.0, 2.0, 1.0]


def test_a_steady_stream_of_queries_slows_bulk_work_but_cannot_stall_it(monkeypatch):
    monkeypatch.setattr(embedder_module, "BULK_YIELD_S", 0.1)
    passes: list[tuple[float, list[str]]] = []
    replica = bulk_replica(passes)
    loaded = SimpleNamespace(budget=ForwardBudget(per_forward=1), dimensions=2)
    replica.no_queries.clear()  # and never set again
    vectors = asyncio.run(replica._encode_yielding(["a", "b", "c"], [1, 1, 1], loaded))
    assert len(passes) == 3 and vectors.shape == (3, 2)
