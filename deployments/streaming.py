"""Streaming answers out of a deployment: fewer, larger messages when tokens come fast.

Every item a Serve deployment yields crosses to its caller as a message of its own (serialized,
sent, deserialized, framed as an SSE event, written to the socket). At ~100 tokens/s for one
stream that per-message work costs as much CPU as decoding does. So deltas are merged: the first
goes out at once (time to first token is untouched), then at most one merged delta per interval,
and the last (the one with the finish reason) at once. Ray Serve LLM does the same
(`stream_batching_interval_ms`, 50 ms by default).

Off by default here (`generator.stream_interval_ms: 0`). bench_generation's table of CPU per
streamed token by process (docs/benchmarks/generation.md) has the cost at 0: served on 2 CPU
cores with llama.cpp, the Ingress spent 3.1 ms of CPU per token at 1 stream and 1.7 at 8, the
Generator 31.8 and 15.0. An ad hoc profile at 50 ms (not a repo run) saw the Ingress at 0.90
against 0.96 ms per token and 8 streams at 101 tok/s either way (at 8 streams a step takes
longer than 50 ms, so nothing merges; at 1 stream 41 against 39 tok/s). Decoding on CPU is
slow next to message handling; on a GPU, where one step serves many fast streams, it is not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from deployments.engines.base import merge
from serve_app.contracts import Delta


async def merged(deltas: AsyncIterator[Delta], interval_s: float) -> AsyncIterator[Delta]:
    """`deltas`, merged so that after the first at most one goes out per `interval_s`.

    A delta is held only while the next one arrives within the interval: text waits at most
    the interval plus one decode step. `interval_s` 0 passes every delta through."""
    held: Delta | None = None
    sent_at = 0.0
    first = True
    async for delta in deltas:
        held = delta if held is None else merge(held, delta)
        now = time.monotonic()
        if first or held.finish_reason is not None or now - sent_at >= interval_s:
            yield held
            held, sent_at, first = None, now, False
    if held is not None:  # a stream that ended without a finish reason
        yield held
