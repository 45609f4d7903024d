"""The service's routes under stepped closed-loop load: what `scripts/loadtest.py` runs and
what the benchmarks that load a route (precompute, shedding) reuse.

`run_load(LoadConfig)` seeds the collection when the route searches one, runs each step's
clients with `loadgen.closed_loop` while sampling /v1/status, and returns a `Run`;
`step_results` and `build_report` summarize it (counts by status, answers/s, latency
percentiles, cache hits by source).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchkit import loadgen
from benchkit.corpus import Texts, license_sentences
from benchkit.loadgen import Record, StepWindow, local_url, retry_after_s
from benchkit.report import percentiles_ms

ROUTES: dict[str, str] = {
    "embeddings": "/v1/embeddings",
    "rerank": "/v1/rerank",
    "chat": "/v1/chat/completions",
    "search": "/v1/search",
    "rag": "/v1/rag/query",
    "ingest": "/v1/documents",
}
SEEDED_ROUTES = frozenset({"search", "rag"})

SEED_DOCUMENTS = 50
SEED_BATCH = 10
SENTENCES_PER_DOCUMENT = 5
RERANK_DOCUMENTS = 8
SEED_ATTEMPTS = 30


@dataclass
class LoadConfig:
    url: str
    route: str
    steps: list[int]
    duration: float
    out: Path
    name: str
    collection: str = "loadtest"
    max_tokens: int = 32
    poll: float = 1.0
    timeout: float = 300.0
    wait_retry_after: bool = True
    ramp: float = 5.0
    zipf: float | None = None
    queries: int = 100
    seed_corpus: bool = True  # search and rag: ingest the seed corpus first
    seed: int = 0
    repeat: bool = False  # cycle the sentences as they are: a cache may answer
    command: str = ""


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    windows: list[StepWindow] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    started_at: str = ""


# --- inputs -----------------------------------------------------------------------------------
def _window(texts: Texts, start: int, size: int) -> list[str]:
    return [texts.at(start + k) for k in range(size)]


def zipf_ranks(exponent: float, queries: int, seed: int = 0) -> Iterator[int]:
    """Endless ranks in [0, queries): rank r with probability proportional to 1 / (r+1)^s."""
    if exponent <= 0 or queries < 1:
        raise ValueError("the Zipf exponent and the number of queries must be positive")
    weights = 1.0 / np.arange(1, queries + 1) ** exponent
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.choice(queries, size=4096, p=weights / weights.sum()).tolist()


def bodies(
    route: str,
    sentences: Sequence[str],
    collection: str = "loadtest",
    max_tokens: int = 32,
    ranks: Iterator[int] | None = None,
    repeat: bool = False,
) -> Iterator[dict[str, Any]]:
    """Endless JSON bodies for a route, reading on through the sentences (none sent twice
    unless `repeat`), or for search and rag drawing each query's sentence by `ranks` (a Zipf
    mix, whose repeats are the point)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}")
    texts = Texts(sentences, repeat=repeat)
    for n in itertools.count():
        if ranks is not None and route in SEEDED_ROUTES:
            sentence = sentences[next(ranks) % len(sentences)]
        else:
            sentence = texts.at(n)
        if route == "embeddings":
            yield {"input": sentence}
        elif route == "rerank":
            yield {"query": sentence, "documents": _window(texts, n + 1, RERANK_DOCUMENTS)}
        elif route == "chat":
            yield {
                "messages": [{"role": "user", "content": sentence}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        elif route == "search":
            yield {"collection": collection, "query": sentence, "top_k": 5}
        elif route == "rag":
            yield {"collection": collection, "query": sentence, "max_tokens": max_tokens}
        else:
            text = " ".join(_window(texts, n * SENTENCES_PER_DOCUMENT, SENTENCES_PER_DOCUMENT))
            yield {"collection": collection, "documents": [{"id": f"loadtest-{n}", "text": text}]}


def seed_batches(
    sentences: Sequence[str], collection: str, count: int = SEED_DOCUMENTS
) -> list[dict[str, Any]]:
    """Ingestion bodies for the seed corpus searched by the search and rag routes."""
    texts = Texts(sentences)
    documents = [
        {
            "id": f"loadtest-seed-{i}",
            "text": " ".join(_window(texts, i * SENTENCES_PER_DOCUMENT, SENTENCES_PER_DOCUMENT)),
        }
        for i in range(count)
    ]
    return [
        {"collection": collection, "documents": documents[i : i + SEED_BATCH]}
        for i in range(0, len(documents), SEED_BATCH)
    ]


# --- status -----------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def parse_status(body: Any, route: str) -> dict[str, Any]:
    """RUNNING replicas per deployment, CPU and memory use, and the route's running/queued."""
    body = _mapping(body)
    replicas = {
        name: int(_mapping(info.get("replicas")).get("RUNNING", 0))
        for name, info in _mapping(body.get("deployments")).items()
        if isinstance(info, dict)
    }
    shedding = _mapping(body.get("shedding"))
    admission = _mapping(_mapping(body.get("routes")).get(route))
    return {
        "replicas": replicas,
        "memory_percent": _number(shedding.get("memory_percent")),
        "cpu_percent": _number(shedding.get("cpu_percent")),
        "running": _number(admission.get("running")),
        "queued": _number(admission.get("queued")),
    }


async def status_sample(client: httpx.AsyncClient, route: str, t: float) -> dict[str, Any] | None:
    """One /v1/status sample taken at t, or None when the poll fails."""
    try:
        response = await client.get("/v1/status")
        response.raise_for_status()
        return {"t": round(t, 3), **parse_status(response.json(), route)}
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return None


async def poll_status(
    client: httpx.AsyncClient,
    route: str,
    interval: float,
    t0: float,
    samples: list[dict[str, Any]],
    stop: asyncio.Event,
) -> None:
    """Sample /v1/status every interval seconds until stop is set; failed polls are skipped."""
    while not stop.is_set():
        sample = await status_sample(client, route, time.perf_counter() - t0)
        if sample is not None:
            samples.append(sample)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


# --- load -------------------------------------------------------------------------------------
def read_cache(status: int, content: bytes) -> str | None:
    """The cache a 200 search or RAG answer came from (its `cache.source`), if any."""
    if status != 200:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return (json.loads(content).get("cache") or {}).get("source")
    return None


async def seed(client: httpx.AsyncClient, batches: Iterable[dict[str, Any]]) -> None:
    """Ingest the seed corpus, waiting out 503s and transport errors."""
    for body in batches:
        for _attempt in range(SEED_ATTEMPTS):
            try:
                response = await client.post(ROUTES["ingest"], json=body)
            except httpx.HTTPError:
                await asyncio.sleep(1.0)
                continue
            if response.status_code == 503:
                await asyncio.sleep(retry_after_s(response.headers))
                continue
            if response.is_success:
                break
            raise RuntimeError(f"seeding failed: {response.status_code} {response.text[:500]}")
        else:
            raise RuntimeError(f"seeding failed: no answer after {SEED_ATTEMPTS} attempts")


async def run_load(cfg: LoadConfig, sentences: Sequence[str] | None = None) -> Run:
    """Seed when needed, then run every step while polling /v1/status."""
    sentences = sentences or license_sentences()
    base = local_url(cfg.url)
    run = Run()
    async with (
        loadgen.session(base, max(cfg.steps), cfg.timeout) as client,
        httpx.AsyncClient(base_url=base, timeout=max(2.0, cfg.poll), trust_env=False) as poller,
    ):
        if cfg.route in SEEDED_ROUTES and cfg.seed_corpus:
            await seed(poller, seed_batches(sentences, cfg.collection))
        ranks = zipf_ranks(cfg.zipf, cfg.queries, cfg.seed) if cfg.zipf else None
        requests = bodies(
            cfg.route, sentences, cfg.collection, cfg.max_tokens, ranks, repeat=cfg.repeat
        )
        read = read_cache if cfg.route in SEEDED_ROUTES else None
        stop = asyncio.Event()
        run.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        polling = asyncio.create_task(
            poll_status(poller, cfg.route, cfg.poll, t0, run.samples, stop)
        )
        try:
            for concurrency in cfg.steps:
                window = await loadgen.closed_loop(
                    client,
                    ROUTES[cfg.route],
                    requests,
                    concurrency,
                    run.records,
                    t0,
                    duration=cfg.duration,
                    wait_retry_after=cfg.wait_retry_after,
                    ramp=cfg.ramp,
                    read=read,
                )
                run.windows.append(window)
        finally:
            stop.set()
            await polling
    return run


# --- results ----------------------------------------------------------------------------------
def summarize(
    records: Sequence[Record], duration: float, samples: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """Counts by status, answers/s over duration and latency percentiles of the records."""
    status = Counter(r.status for r in records)
    answers = [r for r in records if r.status != "error"]
    memory = [s["memory_percent"] for s in samples if s.get("memory_percent") is not None]
    return {
        "requests": len(records),
        "answers": len(answers),
        "throughput_rps": round(len(answers) / duration, 3) if duration > 0 else None,
        "ok_rps": round(status["200"] / duration, 3) if duration > 0 else None,
        "status": dict(sorted(status.items())),
        "latency_ms": {
            "all": percentiles_ms([r.latency for r in answers]),
            "200": percentiles_ms([r.latency for r in records if r.status == "200"]),
            "503": percentiles_ms([r.latency for r in records if r.status == "503"]),
        },
        "missing_retry_after_503": sum(r.status == "503" and not r.retry_after for r in records),
        "max_memory_percent": max(memory) if memory else None,
        "cache": cache_summary(records),
    }


def cache_summary(records: Sequence[Record]) -> dict[str, Any]:
    """Of the 200s: the share answered from a cache, and count and latency by source."""
    ok = [r for r in records if r.status == "200"]
    sources: dict[str, list[Record]] = {}
    for r in ok:
        sources.setdefault(r.detail or "none", []).append(r)
    return {
        "hit_rate": round(sum(r.detail is not None for r in ok) / len(ok), 4) if ok else None,
        "by_source": {
            source: {
                "count": len(chosen),
                "latency_ms": percentiles_ms([r.latency for r in chosen]),
            }
            for source, chosen in sorted(sources.items())
        },
    }


def step_results(run: Run) -> list[dict[str, Any]]:
    results = []
    for window in run.windows:
        records = [r for r in run.records if window.start <= r.t <= window.end]
        samples = [s for s in run.samples if window.start <= s["t"] <= window.end]
        elapsed = window.end - window.start
        results.append(
            {
                "concurrency": window.concurrency,
                "start_s": round(window.start, 3),
                "elapsed_s": round(elapsed, 3),
                **summarize(records, elapsed, samples),
            }
        )
    return results


def build_report(cfg: LoadConfig, run: Run) -> dict[str, Any]:
    elapsed = sum(w.end - w.start for w in run.windows)
    return {
        "command": cfg.command,
        "url": cfg.url,
        "route": cfg.route,
        "path": ROUTES[cfg.route],
        "steps": cfg.steps,
        "duration": cfg.duration,
        "collection": cfg.collection,
        "max_tokens": cfg.max_tokens,
        "poll": cfg.poll,
        "timeout": cfg.timeout,
        "ramp_s": cfg.ramp,
        "wait_retry_after": cfg.wait_retry_after,
        "mix": {"zipf": cfg.zipf, "queries": cfg.queries, "seed": cfg.seed} if cfg.zipf else None,
        "repeat": cfg.repeat,
        "started_at": run.started_at,
        "host": {"node": platform.node(), "cpu_count": os.cpu_count()},
        "results": step_results(run),
        "overall": summarize(run.records, elapsed, run.samples),
        "replicas": [{"t": s["t"], "replicas": s["replicas"]} for s in run.samples],
        "resources": [
            {k: s[k] for k in ("t", "memory_percent", "cpu_percent", "running", "queued")}
            for s in run.samples
        ],
    }
