"""Every custom metric the application exports, in one place.

Ray exports them on its Prometheus endpoint with a `ray_` prefix (counters also get `_total`)
and the dashboard's Metrics view charts them. docs/observability.md lists them. Each process
creates its metrics once, on first use, inside the replica that records them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from ray.util import metrics

if TYPE_CHECKING:
    from deployments.engines.base import Sequence

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
TOKEN_BOUNDARIES = [16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
# Milliseconds, for waits and stages that range from a cache hit to a long generation.
LATENCY_BOUNDARIES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


@dataclass(frozen=True)
class RouteMetrics:
    admitted: metrics.Counter
    rejected: metrics.Counter
    timed_out: metrics.Counter
    retried: metrics.Counter
    unauthorized: metrics.Counter
    running: metrics.Gauge
    queued: metrics.Gauge
    queue_wait_ms: metrics.Histogram


@cache
def route_metrics() -> RouteMetrics:
    """Admission control of the ingress routes (embeddings, rerank, chat, search, rag, ingest)."""
    return RouteMetrics(
        admitted=metrics.Counter(
            "rag_route_admitted", "Requests admitted to run.", tag_keys=("route",)
        ),
        rejected=metrics.Counter(
            "rag_route_rejected",
            "Requests answered 503: queue_full, queue_wait, resource_pressure or backpressure.",
            tag_keys=("route", "reason"),
        ),
        timed_out=metrics.Counter(
            "rag_route_timed_out", "Requests answered 504 at their deadline.", tag_keys=("route",)
        ),
        retried=metrics.Counter(
            "rag_route_retried",
            "Idempotent model calls made again after their replica died.",
            tag_keys=("route",),
        ),
        unauthorized=metrics.Counter(
            "rag_unauthorized", "Requests answered 401: no API key, or an unknown one."
        ),
        running=metrics.Gauge("rag_route_running", "Requests running now.", tag_keys=("route",)),
        queued=metrics.Gauge(
            "rag_route_queued", "Requests waiting for a slot now.", tag_keys=("route",)
        ),
        queue_wait_ms=metrics.Histogram(
            "rag_route_queue_wait_ms",
            "Time an admitted request waited for its slot (0 when one was free).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("route",),
        ),
    )


@dataclass(frozen=True)
class HostMetrics:
    cpu_stall_percent: metrics.Gauge
    memory_stall_percent: metrics.Gauge
    memory_percent: metrics.Gauge
    shedding: metrics.Gauge


@cache
def host_metrics() -> HostMetrics:
    """Host pressure as the ingress sees it, and whether it is shedding heavy routes."""
    return HostMetrics(
        cpu_stall_percent=metrics.Gauge(
            "rag_host_cpu_stall_percent", "Share of time tasks waited for CPU (PSI), or throttled."
        ),
        memory_stall_percent=metrics.Gauge(
            "rag_host_memory_stall_percent", "Share of time tasks waited for memory (PSI)."
        ),
        memory_percent=metrics.Gauge(
            "rag_host_memory_percent", "Memory in use, of the cgroup's limit or the host's."
        ),
        shedding=metrics.Gauge("rag_shedding_active", "1 while heavy routes are refused."),
    )


@cache
def batch_sizes() -> metrics.Histogram:
    """Items (sentences, pairs, sequences) per executed batch, per model deployment."""
    return metrics.Histogram(
        "rag_batch_size",
        "Items in each executed model batch.",
        boundaries=BATCH_BOUNDARIES,
        tag_keys=("deployment",),
    )


@cache
def batch_tokens() -> metrics.Histogram:
    """Tokens per executed batch, per model deployment: what the forward pass had to read
    (Embedder, Reranker), or the cache the decode step holds room for (Generator)."""
    return metrics.Histogram(
        "rag_batch_tokens",
        "Tokens in each executed model batch.",
        boundaries=TOKEN_BOUNDARIES,
        tag_keys=("deployment",),
    )


@dataclass(frozen=True)
class CacheMetrics:
    hits: metrics.Counter
    misses: metrics.Counter
    errors: metrics.Counter


@cache
def cache_metrics() -> CacheMetrics:
    """Embedding and response caches (serve_app/cache.py), tagged `cache`: embedding, search,
    rerank. Creating and recording these outside a Ray worker works (the records go nowhere),
    so the unit tests need no Ray."""
    return CacheMetrics(
        hits=metrics.Counter("rag_cache_hits", "Keys found in the cache.", tag_keys=("cache",)),
        misses=metrics.Counter(
            "rag_cache_misses",
            "Keys not found, or not looked up because the cache backend was unavailable.",
            tag_keys=("cache",),
        ),
        errors=metrics.Counter(
            "rag_cache_errors",
            "Failed cache operations (Redis down, timed out, refused); each was a miss or a skip.",
            tag_keys=("cache",),
        ),
    )


@dataclass(frozen=True)
class ClassifyMetrics:
    inputs: metrics.Counter
    latency: metrics.Histogram


@cache
def classify_metrics() -> ClassifyMetrics:
    """The classification cascade: who decided each input, and request latency by path."""
    return ClassifyMetrics(
        inputs=metrics.Counter(
            "rag_classify_inputs",
            "Inputs classified, by who decided: embedding (fast path) or llm (escalated).",
            tag_keys=("decided_by",),
        ),
        latency=metrics.Histogram(
            "rag_classify_latency_ms",
            "Classify request latency; path llm when any input of it was escalated.",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
            tag_keys=("path",),
        ),
    )


@cache
def chat_ttft_ms() -> metrics.Histogram:
    """Time to first token of chat completions, as the ingress sees it: from the request's
    arrival (its queueing for a slot included) to the first generated text."""
    return metrics.Histogram(
        "rag_chat_ttft_ms",
        "Chat completion time to first token, queueing included.",
        boundaries=[25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
    )


@cache
def chat_tpot_ms() -> metrics.Histogram:
    """Time per output token of chat completions after the first: the decode speed a client
    sees, the generator's batch mates included."""
    return metrics.Histogram(
        "rag_chat_tpot_ms",
        "Chat completion time per output token after the first.",
        boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
    )


@cache
def generated_tokens() -> metrics.Counter:
    """Tokens the generator produced for the answers of a route (chat, rag): their rate is
    the generator's tokens per second as the clients receive them."""
    return metrics.Counter(
        "rag_generated_tokens", "Generated tokens delivered, by route.", tag_keys=("route",)
    )


@cache
def generator_tpot_ms() -> metrics.Histogram:
    """Time per output token after the first of every answer the generator decodes (chat and
    RAG), at the generator: what its decode loop gives each sequence, batch mates included,
    without the handle and the ingress's streaming."""
    return metrics.Histogram(
        "rag_generator_tpot_ms",
        "Generator time per output token after the first, per finished answer.",
        boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
        tag_keys=("deployment",),
    )


@cache
def generator_step_tokens() -> metrics.Histogram:
    """Tokens each decode step of the generator produced: one per sequence that got a token
    (a cancelled one gets none)."""
    return metrics.Histogram(
        "rag_generator_step_tokens",
        "Tokens generated in each decode step of the generator.",
        boundaries=BATCH_BOUNDARIES,
        tag_keys=("deployment",),
    )


@cache
def generator_decoded_tokens() -> metrics.Counter:
    """The same tokens counted: its rate is the generator's decoded tokens/s. Exact, where the
    histogram's `_sum` is not (Ray exports it from the midpoints of the buckets)."""
    return metrics.Counter(
        "rag_generator_decoded_tokens",
        "Tokens generated by the generator's decode steps.",
        tag_keys=("deployment",),
    )


@dataclass
class DecodeSteps:
    """The generator's decode steps into `generator_step_tokens`, `generator_decoded_tokens`
    and `generator_tpot_ms`.

    `stepped` is called after each step with the sequences that were in it. A sequence's time
    per output token runs from the end of the step that gave its first token to the end of the
    one that finished it, over the tokens in between; a failed or cancelled sequence records
    none. Only sequences of the last step are kept, so those lost to a failed step (which
    never reach `stepped`) are forgotten at the next one."""

    clock: Callable[[], float] = time.perf_counter
    deployment: str = "Generator"  # or RagGenerator: the metrics' `deployment` tag
    # id of a sequence -> (the sequence, when its first token came, its tokens then); the
    # sequence is held so that its id cannot be reused while it is here.
    first: dict[int, tuple[Sequence, float, int]] = field(default_factory=dict)

    def stepped(self, sequences: Iterable[Sequence]) -> None:
        now = self.clock()
        tokens = 0
        first = {}
        for sequence in sequences:
            delta = sequence.delta
            if sequence.error is not None or delta is None or delta.finish_reason == "cancelled":
                continue
            tokens += 1
            _, since, before = self.first.get(
                id(sequence), (sequence, now, delta.completion_tokens)
            )
            if not sequence.done:
                first[id(sequence)] = (sequence, since, before)
            elif delta.completion_tokens > before:
                tpot = (now - since) * 1000 / (delta.completion_tokens - before)
                generator_tpot_ms().observe(tpot, tags={"deployment": self.deployment})
        self.first = first
        if tokens:
            tags = {"deployment": self.deployment}
            generator_step_tokens().observe(tokens, tags=tags)
            generator_decoded_tokens().inc(tokens, tags=tags)


@cache
def stage_latency_ms() -> metrics.Histogram:
    """Where the time of a search or RAG answer goes: embed, search, rerank, generate."""
    return metrics.Histogram(
        "rag_stage_latency_ms",
        "Time of each stage of a search or RAG answer.",
        boundaries=LATENCY_BOUNDARIES,
        tag_keys=("pipeline", "stage"),
    )


def record_stages(pipeline: str, timings: dict[str, float]) -> None:
    """Stage `timings` into the stage histogram: the retriever's (`embed_ms`, `search_ms`,
    `rerank_ms`; none for a cached answer), RAG's `fit_ms`, `first_token_ms`, `generate_ms`."""
    histogram = stage_latency_ms()
    for name, ms in timings.items():
        histogram.observe(ms, tags={"pipeline": pipeline, "stage": name.removesuffix("_ms")})


@cache
def store_unavailable() -> metrics.Counter:
    """Calls refused because the document store could not be reached: the alert's signal."""
    return metrics.Counter(
        "rag_store_unavailable", "Store calls answered 503 because the database was unreachable."
    )
