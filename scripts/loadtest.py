"""Bounded closed-loop HTTP load against one route of the service on this machine.

    .venv/bin/python scripts/loadtest.py --route chat --steps 1,5,50 --duration 60 \\
        [--url http://127.0.0.1:8000] [--out docs/benchmarks] [--name NAME] \\
        [--collection loadtest] [--max-tokens 32] [--poll 1.0] [--timeout 300] \\
        [--zipf 1.1 --queries 100 --seed 0]

Routes: embeddings, rerank, chat, search, rag, ingest. Each step of --steps runs that many
clients for --duration seconds, one step after the other; each client sends a request, waits
for the answer and sends the next. Only 127.0.0.1, localhost and ::1 are accepted as targets;
a step runs at most 512 clients for at most 600 s.

Bodies rotate through English sentences of 8-40 words taken from the license texts in
/usr/share/common-licenses. For search and rag, a seed corpus is ingested into --collection
before the load starts. With --zipf S (search and rag), each query is instead drawn from the
first --queries sentences with probability proportional to 1 / rank^S, as popular queries are
asked in real traffic; the report then counts answers by their cache (`precomputed`,
`response`, or none) with the latency of each.

While the load runs, /v1/status is polled every --poll seconds for the RUNNING replicas of each
deployment, the shedding monitor's CPU and memory use, and the route's running and queued
requests. Writes OUT/loadtest-NAME.json (per-step results and the sampled time series) and
OUT/loadtest-NAME.png (offered load and answers/s, latency per request, replicas over time).

An answer is any HTTP response; a transport error or client-side timeout is counted under the
status "error" and is not an answer. Latency percentiles are in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

ROUTES: dict[str, str] = {
    "embeddings": "/v1/embeddings",
    "rerank": "/v1/rerank",
    "chat": "/v1/chat/completions",
    "search": "/v1/search",
    "rag": "/v1/rag/query",
    "ingest": "/v1/documents",
}
SEEDED_ROUTES = frozenset({"search", "rag"})
ALLOWED_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_CONCURRENCY = 512
MAX_DURATION_S = 600.0
PERCENTILES = (50, 95, 99)

SEED_DOCUMENTS = 50
SEED_BATCH = 10
SENTENCES_PER_DOCUMENT = 5
RERANK_DOCUMENTS = 8
SEED_ATTEMPTS = 30

FALLBACK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "A lighthouse keeper climbs the spiral stairs every evening to light the great lamp.",
    "Bread is made from flour, water, salt and yeast, kneaded and left to rise for hours.",
    "The steam engine turns the heat of burning coal into the motion of a piston and wheel.",
    "Bicycles became popular in the late nineteenth century once the safety design appeared.",
    "Rivers carry sediment from the mountains down to the sea, building deltas over centuries.",
    "A good library keeps books, maps and records so that anyone may read and learn from them.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
]


@dataclass(frozen=True)
class Record:
    """One request: start time since the run began, latency, status and the step's clients."""

    t: float
    latency: float
    status: str
    concurrency: int
    retry_after: bool = False
    cache: str | None = None  # where a search or RAG answer came from, if a cache


@dataclass(frozen=True)
class StepWindow:
    concurrency: int
    start: float
    end: float


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
    command: str = ""


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    windows: list[StepWindow] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    started_at: str = ""


# --- target and inputs ------------------------------------------------------------------------
def check_url(url: str) -> str:
    """The base URL without a trailing slash; ValueError unless it is http(s) on this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--url must be http:// or https://, got {url!r}")
    host = parts.hostname
    if host not in ALLOWED_HOSTS:
        allowed = ", ".join(sorted(ALLOWED_HOSTS))
        raise ValueError(f"--url host {host!r} is not allowed: load is only sent to {allowed}")
    return url.rstrip("/")


def corpus_sentences(limit: int = 4096) -> list[str]:
    """English sentences of 8-40 words from the license texts every Debian system ships."""
    folder = Path("/usr/share/common-licenses")
    files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    text = " ".join(p.read_text(errors="ignore") for p in files)
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    chosen = [s for s in sentences if 8 <= len(s.split()) <= 40][:limit]
    return chosen or list(FALLBACK_SENTENCES)


def _window(sentences: Sequence[str], start: int, size: int) -> list[str]:
    return [sentences[(start + k) % len(sentences)] for k in range(size)]


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
) -> Iterator[dict[str, Any]]:
    """Endless JSON bodies for a route, rotating through the sentences, or for search and
    rag drawing each query's sentence by `ranks` (a Zipf mix)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}")
    for n in itertools.count():
        index = next(ranks) if ranks is not None and route in SEEDED_ROUTES else n
        sentence = sentences[index % len(sentences)]
        if route == "embeddings":
            yield {"input": sentence}
        elif route == "rerank":
            yield {"query": sentence, "documents": _window(sentences, n + 1, RERANK_DOCUMENTS)}
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
            text = " ".join(_window(sentences, n * SENTENCES_PER_DOCUMENT, SENTENCES_PER_DOCUMENT))
            yield {"collection": collection, "documents": [{"id": f"loadtest-{n}", "text": text}]}


def seed_batches(
    sentences: Sequence[str], collection: str, count: int = SEED_DOCUMENTS
) -> list[dict[str, Any]]:
    """Ingestion bodies for the seed corpus searched by the search and rag routes."""
    documents = [
        {
            "id": f"loadtest-seed-{i}",
            "text": " ".join(
                _window(sentences, i * SENTENCES_PER_DOCUMENT, SENTENCES_PER_DOCUMENT)
            ),
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
async def send(
    client: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> tuple[str, float, float | None, str | None]:
    """Status (a code, or "error"), latency in seconds, Retry-After in seconds if sent, and
    the cache a 200 search or RAG answer came from (its `cache.source`), if any."""
    start = time.perf_counter()
    try:
        async with client.post(path, json=body) as response:
            content = await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return "error", time.perf_counter() - start, None, None
    latency = time.perf_counter() - start
    retry_after = _retry_after(response) if "retry-after" in response.headers else None
    cache = None
    if response.status == 200 and path in (ROUTES["search"], ROUTES["rag"]):
        with contextlib.suppress(ValueError, AttributeError):
            cache = (json.loads(content).get("cache") or {}).get("source")
    return str(response.status), latency, retry_after, cache


async def run_step(
    client: aiohttp.ClientSession,
    path: str,
    requests: Iterator[dict[str, Any]],
    concurrency: int,
    duration: float,
    t0: float,
    records: list[Record],
    wait_retry_after: bool = True,
    ramp: float = 0.0,
) -> StepWindow:
    """Closed-loop clients until duration has passed; requests in flight then are awaited.

    A client refused with 503 waits its Retry-After before the next request, as the OpenAI
    SDKs do, unless `wait_retry_after` is off (then it retries at once). Clients start evenly
    over the first `ramp` seconds, as load tools spawn users, rather than in one instant.
    """
    start = time.perf_counter()
    deadline = start + duration

    async def client_loop(index: int) -> None:
        await asyncio.sleep(min(ramp * index / concurrency, duration))
        while time.perf_counter() < deadline:
            sent = time.perf_counter() - t0
            status, latency, retry_after, cache = await send(client, path, next(requests))
            records.append(
                Record(sent, latency, status, concurrency, retry_after is not None, cache)
            )
            if status == "503" and wait_retry_after and retry_after:
                await asyncio.sleep(max(0.0, min(retry_after, deadline - time.perf_counter())))

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    return StepWindow(concurrency, start - t0, time.perf_counter() - t0)


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
                await asyncio.sleep(_retry_after(response))
                continue
            if response.is_success:
                break
            raise RuntimeError(f"seeding failed: {response.status_code} {response.text[:500]}")
        else:
            raise RuntimeError(f"seeding failed: no answer after {SEED_ATTEMPTS} attempts")


def _retry_after(response: httpx.Response | aiohttp.ClientResponse) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "1")), 0.1), 30.0)
    except ValueError:
        return 1.0


async def run_load(cfg: LoadConfig, sentences: Sequence[str] | None = None) -> Run:
    """Seed when needed, then run every step while polling /v1/status."""
    sentences = sentences or corpus_sentences()
    base = check_url(cfg.url)
    width = max(cfg.steps)
    run = Run()
    # aiohttp for the load itself: on 2 cores httpx's per-request CPU cost (about 4x
    # aiohttp's here) would make the client, not the service, the bottleneck.
    async with (
        aiohttp.ClientSession(
            base_url=base,
            connector=aiohttp.TCPConnector(limit=width),
            timeout=aiohttp.ClientTimeout(total=cfg.timeout),
        ) as client,
        httpx.AsyncClient(base_url=base, timeout=max(2.0, cfg.poll), trust_env=False) as poller,
    ):
        if cfg.route in SEEDED_ROUTES and cfg.seed_corpus:
            await seed(poller, seed_batches(sentences, cfg.collection))
        ranks = zipf_ranks(cfg.zipf, cfg.queries, cfg.seed) if cfg.zipf else None
        requests = bodies(cfg.route, sentences, cfg.collection, cfg.max_tokens, ranks)
        stop = asyncio.Event()
        run.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        polling = asyncio.create_task(
            poll_status(poller, cfg.route, cfg.poll, t0, run.samples, stop)
        )
        try:
            for concurrency in cfg.steps:
                window = await run_step(
                    client,
                    ROUTES[cfg.route],
                    requests,
                    concurrency,
                    cfg.duration,
                    t0,
                    run.records,
                    cfg.wait_retry_after,
                    cfg.ramp,
                )
                run.windows.append(window)
        finally:
            stop.set()
            await polling
    return run


# --- results ----------------------------------------------------------------------------------
def percentiles_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {f"p{p}": None for p in PERCENTILES}
    values = np.percentile(np.asarray(latencies, dtype=float), PERCENTILES) * 1000.0
    return {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, values, strict=True)}


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
        sources.setdefault(r.cache or "none", []).append(r)
    return {
        "hit_rate": round(sum(r.cache is not None for r in ok) / len(ok), 4) if ok else None,
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


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """Plain aligned text: one row per step and one overall."""
    header = (
        "clients",
        "requests",
        "ans/s",
        "200",
        "503",
        "other",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p95 200",
        "p95 503",
        "503 no RA",
        "max mem%",
    )
    rows = [header]
    labelled = [(str(r["concurrency"]), r) for r in report["results"]]
    for label, r in [*labelled, ("all", report["overall"])]:
        status = r["status"]
        other = sum(n for code, n in status.items() if code not in ("200", "503"))
        latency = r["latency_ms"]
        rows.append(
            (
                label,
                str(r["requests"]),
                _fmt(r["throughput_rps"], 1),
                str(status.get("200", 0)),
                str(status.get("503", 0)),
                str(other),
                _fmt(latency["all"]["p50"]),
                _fmt(latency["all"]["p95"]),
                _fmt(latency["all"]["p99"]),
                _fmt(latency["200"]["p95"]),
                _fmt(latency["503"]["p95"]),
                str(r["missing_retry_after_503"]),
                _fmt(r["max_memory_percent"], 1),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


# --- plot -------------------------------------------------------------------------------------
def _status_class(status: str) -> str:
    """200, 503, or other (any other code, or a client-side error)."""
    return status if status in ("200", "503") else "other"


def plot(report: dict[str, Any], run: Run, path: Path) -> None:
    """Offered load and answers/s, latency per request, and RUNNING replicas over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"200": "tab:green", "503": "tab:orange", "other": "tab:red"}
    fig, (load_ax, latency_ax, replica_ax) = plt.subplots(
        3, 1, sharex=True, figsize=(11, 10), constrained_layout=True
    )
    steps = ",".join(str(s) for s in report["steps"])
    fig.suptitle(f"loadtest {report['route']}: steps {steps} x {report['duration']:g} s")

    end = max([w.end for w in run.windows] + [r.t + r.latency for r in run.records] + [1.0])
    buckets = math.ceil(end)
    bottom = np.zeros(buckets)
    for label in ("200", "503", "other"):
        done = [int(r.t + r.latency) for r in run.records if _status_class(r.status) == label]
        if not done:
            continue
        counts = np.bincount(np.minimum(done, buckets - 1), minlength=buckets)
        load_ax.bar(
            np.arange(buckets),
            counts,
            width=1.0,
            align="edge",
            bottom=bottom,
            color=colors[label],
            label=f"{label}/s",
        )
        bottom += counts
    load_ax.set_ylabel("answers per second")
    offered = load_ax.twinx()
    if run.windows:
        xs = [w.start for w in run.windows] + [run.windows[-1].end]
        ys = [w.concurrency for w in run.windows] + [run.windows[-1].concurrency]
        offered.plot(xs, ys, drawstyle="steps-post", color="black", lw=1.5, label="clients")
    offered.set_ylabel("clients (offered load)")
    offered.set_ylim(bottom=0)
    handles = load_ax.get_legend_handles_labels()[0] + offered.get_legend_handles_labels()[0]
    load_ax.legend(handles=handles, loc="upper left", fontsize="small")

    for label in ("200", "503", "other"):
        chosen = [r for r in run.records if _status_class(r.status) == label]
        if chosen:
            latency_ax.scatter(
                [r.t for r in chosen],
                [max(r.latency, 1e-4) for r in chosen],
                s=4,
                alpha=0.5,
                color=colors[label],
                label=label,
                rasterized=True,
            )
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("latency (s)")
    if run.records:
        latency_ax.legend(loc="upper left", fontsize="small", markerscale=3)

    names = sorted({name for s in run.samples for name in s["replicas"]})
    times = [s["t"] for s in run.samples]
    for name in names:
        counts = [s["replicas"].get(name, 0) for s in run.samples]
        replica_ax.step(times, counts, where="post", label=name)
    if names:
        replica_ax.legend(loc="upper left", fontsize="small")
    else:
        replica_ax.text(
            0.5, 0.5, "no /v1/status samples", ha="center", transform=replica_ax.transAxes
        )
    replica_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    replica_ax.set_ylim(
        -0.2, max([c for s in run.samples for c in s["replicas"].values()] + [1]) + 0.5
    )
    replica_ax.set_ylabel("RUNNING replicas")
    replica_ax.set_xlabel("time since start (s)")

    for ax in (load_ax, latency_ax, replica_ax):
        for window in run.windows[1:]:
            ax.axvline(window.start, color="gray", ls=":", lw=0.8)
        ax.set_xlim(0, end)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry ------------------------------------------------------------------------------------
def execute(cfg: LoadConfig, sentences: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the load, print the table and write loadtest-NAME.json and .png under cfg.out."""
    run = asyncio.run(run_load(cfg, sentences))
    report = build_report(cfg, run)
    cfg.out.mkdir(parents=True, exist_ok=True)
    json_path = cfg.out / f"loadtest-{cfg.name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {json_path}")
    png_path = cfg.out / f"loadtest-{cfg.name}.png"
    try:
        plot(report, run, png_path)
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    else:
        print(f"wrote {png_path}")
    return report


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be integers, got {text!r}") from None
    if not steps or any(not 1 <= s <= MAX_CONCURRENCY for s in steps):
        raise argparse.ArgumentTypeError(f"each step must be between 1 and {MAX_CONCURRENCY}")
    return steps


def parse_args(argv: Sequence[str] | None = None) -> LoadConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", required=True, choices=sorted(ROUTES))
    parser.add_argument("--steps", required=True, type=parse_steps, help="e.g. 1,5,50")
    parser.add_argument("--duration", required=True, type=float, help="seconds per step")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--name", help="output name (default: the route)")
    parser.add_argument("--collection", default="loadtest")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--ramp", type=float, default=5.0, help="seconds over which a step's clients start"
    )
    parser.add_argument("--zipf", type=float, help="search/rag: Zipf exponent of the query mix")
    parser.add_argument("--queries", type=int, default=100, help="distinct queries in the mix")
    parser.add_argument("--seed", type=int, default=0, help="of the query mix")
    parser.add_argument(
        "--no-seed",
        dest="seed_corpus",
        action="store_false",
        help="search/rag: the --collection already holds the seed corpus",
    )
    parser.add_argument(
        "--no-retry-wait",
        dest="wait_retry_after",
        action="store_false",
        help="retry a 503 at once instead of waiting its Retry-After",
    )
    args = parser.parse_args(argv)
    try:
        url = check_url(args.url)
    except ValueError as e:
        parser.error(str(e))
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if args.poll < 0.1 or args.timeout <= 0 or args.max_tokens < 1:
        parser.error("--poll must be at least 0.1, --timeout and --max-tokens positive")
    if args.zipf is not None and (args.zipf <= 0 or args.queries < 1):
        parser.error("--zipf and --queries must be positive")
    name = args.name or args.route
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        parser.error(f"--name {name!r} must be letters, digits, '_', '.' or '-'")
    return LoadConfig(
        url=url,
        route=args.route,
        steps=args.steps,
        duration=args.duration,
        out=args.out,
        name=name,
        collection=args.collection,
        max_tokens=args.max_tokens,
        poll=args.poll,
        timeout=args.timeout,
        wait_retry_after=args.wait_retry_after,
        seed_corpus=args.seed_corpus,
        ramp=args.ramp,
        zipf=args.zipf,
        queries=args.queries,
        seed=args.seed,
        command=" ".join([".venv/bin/python", *sys.argv]),
    )


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        execute(cfg)
    except RuntimeError as e:
        raise SystemExit(f"loadtest: {e}") from None


if __name__ == "__main__":
    main()
