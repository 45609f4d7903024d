"""Closed-loop HTTP load against the service on this machine, and the guard that keeps it there.

One generator serves every script: `closed_loop` runs N clients, each sending its next request
when its last is answered, and records every answer as a `Record`. What a script measures
(throughput of items, latency of 200s, refusals by reason) it derives from the records.
`window` is the benchmarks' measurement on top of it: a warm-up, then a measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

ALLOWED_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Reads a detail out of an answer (status code, body bytes): a cache source, an item count.
Reader = Callable[[int, bytes], Any]
# Asks the service how it stands, on the load's session: a snapshot, and whether it has settled
# (the measured window may start).
Probe = Callable[[aiohttp.ClientSession], Awaitable[tuple[Any, bool]]]


def local_url(url: str) -> str:
    """The base URL without a trailing slash; ValueError unless it is http(s) on this machine.

    Load is only ever sent to this machine: a typo must not load someone else's service."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the URL must be http:// or https://, got {url!r}")
    if parts.hostname not in ALLOWED_HOSTS:
        allowed = ", ".join(sorted(ALLOWED_HOSTS))
        raise ValueError(f"host {parts.hostname!r} is not allowed: load is only sent to {allowed}")
    return url.rstrip("/")


@dataclass(frozen=True)
class Record:
    """One request: when it was sent (seconds since the run's t0), its latency in seconds, its
    status ("200", "503", ... or "error" for a transport failure or client timeout), the
    clients of its step, whether a Retry-After came with it, and what `read` found in it."""

    t: float
    latency: float
    status: str
    concurrency: int
    retry_after: bool = False
    detail: Any = None

    @property
    def done(self) -> float:
        return self.t + self.latency


@dataclass(frozen=True)
class StepWindow:
    """The clients of one step and when (since t0) it started and ended."""

    concurrency: int
    start: float
    end: float


def retry_after_s(headers: Any) -> float:
    """A Retry-After header in seconds, bounded to [0.1, 30]; 1 when unreadable."""
    try:
        return min(max(float(headers.get("retry-after", "1")), 0.1), 30.0)
    except ValueError:
        return 1.0


async def send(
    session: aiohttp.ClientSession, path: str, body: Any, read: Reader | None = None
) -> tuple[str, float, float | None, Any]:
    """POST `body` to `path` (GET when `body` is None): the status (a code, or "error"), the
    latency in seconds, the Retry-After in seconds if one was sent, and `read(status, body)`."""
    start = time.perf_counter()
    try:
        request = session.get(path) if body is None else session.post(path, json=body)
        async with request as response:
            content = await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return "error", time.perf_counter() - start, None, None
    latency = time.perf_counter() - start
    retry_after = retry_after_s(response.headers) if "retry-after" in response.headers else None
    detail = read(response.status, content) if read is not None else None
    return str(response.status), latency, retry_after, detail


async def closed_loop(
    session: aiohttp.ClientSession,
    path: str,
    requests: Iterator[Any],
    concurrency: int,
    records: list[Record],
    t0: float,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    wait_retry_after: bool = True,
    ramp: float = 0.0,
    read: Reader | None = None,
    error_pause: float = 0.0,
) -> StepWindow:
    """`concurrency` clients, each sending `next(requests)` to `path` when its last request is
    answered, until `duration` seconds have passed or `stop` is set; requests in flight then
    are awaited (the session's timeout bounds them). Every request is appended to `records`.

    A client refused with 503 waits its Retry-After before the next request, as the OpenAI
    SDKs do, unless `wait_retry_after` is off; after any other failure it waits `error_pause`
    (a dead server is not hammered). Clients start evenly over the first `ramp` seconds, as
    load tools spawn users, rather than in one instant.
    """
    if duration is None and stop is None:
        raise ValueError("closed_loop needs a duration or a stop event")
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")

    def running() -> bool:
        return time.perf_counter() < deadline and not (stop is not None and stop.is_set())

    async def client(index: int) -> None:
        await asyncio.sleep(min(ramp * index / concurrency, duration or ramp))
        while running():
            sent = time.perf_counter() - t0
            status, latency, retry_after, detail = await send(session, path, next(requests), read)
            has_retry_after = retry_after is not None
            records.append(Record(sent, latency, status, concurrency, has_retry_after, detail))
            pause = 0.0
            if status == "503" and wait_retry_after and retry_after:
                pause = retry_after
            elif status != "200":
                pause = error_pause
            if pause > 0:
                await asyncio.sleep(max(0.0, min(pause, deadline - time.perf_counter())))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return StepWindow(concurrency, start - t0, time.perf_counter() - t0)


def session(base_url: str, concurrency: int, timeout_s: float | None) -> aiohttp.ClientSession:
    """An aiohttp session for `concurrency` clients of `base_url` (checked to be local).

    aiohttp rather than httpx for load: on 2 cores httpx's per-request CPU cost (about 4x
    aiohttp's here) would make the client, not the service, the bottleneck."""
    return aiohttp.ClientSession(
        base_url=local_url(base_url),
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


def in_window(records: list[Record], start: float, end: float) -> list[Record]:
    """The records answered within [start, end] (seconds since t0)."""
    return [r for r in records if start <= r.done <= end]


@dataclass(frozen=True)
class Window:
    """What `window` measured: the records answered within it, when it started and ended
    (seconds since the load began), the probe's snapshots at its start and end, and the
    meter's readings just before it started and just after it ended (None without them)."""

    records: list[Record]
    start: float
    end: float
    at_start: Any = None
    at_end: Any = None
    before: Any = None
    after: Any = None

    def statuses(self) -> Counter[str]:
        return Counter(r.status for r in self.records)

    def latencies(self) -> list[float]:
        """The latencies of the 200s, in seconds."""
        return [r.latency for r in self.records if r.status == "200"]


async def window(
    base_url: str,
    path: str,
    requests: Iterator[Any],
    concurrency: int,
    warmup: float,
    duration: float,
    *,
    probe: Probe | None = None,
    max_settle: float = 60.0,
    meter: Callable[[], Any] | None = None,
    drop_in_flight: bool = False,
    timeout_s: float = 120.0,
) -> Window:
    """`concurrency` closed-loop clients (`closed_loop`) of `base_url` on a session of their
    own: `warmup` seconds, then a measured window of `duration` s. `requests` yields the
    bodies (None: a GET), each with new inputs where no cache may answer.

    Clients ignore Retry-After and pause 50 ms after any failure, so a refusing or dead server
    is not hammered. With `probe`, the warm-up goes on past `warmup` until it reports settled
    (for at most `max_settle` s more; autoscaling under the load), and it is asked again at
    the end. `meter` (CPU counters, say) is read just before the window and just after.
    Requests still out when it ends are awaited and not counted, or with `drop_in_flight`
    cancelled (their connections closed) rather than awaited.
    """
    records: list[Record] = []
    stop = asyncio.Event()
    at_start = at_end = None
    async with session(base_url, concurrency + (probe is not None), timeout_s) as client:
        t0 = time.perf_counter()
        loop = asyncio.create_task(
            closed_loop(
                client,
                path,
                requests,
                concurrency,
                records,
                t0,
                stop=stop,
                wait_retry_after=False,
                error_pause=0.05,
            )
        )
        try:
            await asyncio.sleep(warmup)
            if probe is not None:
                at_start, settled = await probe(client)
                while not settled and time.perf_counter() - t0 < warmup + max_settle:
                    await asyncio.sleep(1.0)
                    at_start, settled = await probe(client)
            before = meter() if meter is not None else None
            start = time.perf_counter() - t0
            await asyncio.sleep(duration)
            end = time.perf_counter() - t0
            after = meter() if meter is not None else None
            if probe is not None:
                at_end, _ = await probe(client)
        except BaseException:
            loop.cancel()
            raise
        stop.set()
        if drop_in_flight:
            loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    return Window(in_window(records, start, end), start, end, at_start, at_end, before, after)
