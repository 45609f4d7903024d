"""Per-route admission control in the ingress: limits, queues, deadlines and load shedding.

A request asks its route's `Gate` for a slot. It runs at once if fewer than `max_running`
are running, waits in a FIFO queue if fewer than `max_queued` wait, and otherwise is refused
at once with 503 `overloaded` and `Retry-After`. A route whose oldest queued request has
waited a set share of the deadline refuses newcomers too. Heavy routes are also refused while
memory runs short, and while CPU stalls those that would have to queue: the signals are
pressure-stall information and memory headroom, of the container's cgroup where it has one,
never CPU use itself. A request's deadline counts from arrival: one still waiting
or running when it passes gets 504, and the model calls it made are cancelled. A call to a
replica that dies under it is made once more where the route is idempotent; elsewhere the
request fails with 503 `replica_unavailable`.

Background work (precomputing popular answers) takes a route's slot only when one is free,
nobody waits and the host is not under pressure, and gives it up the moment a client needs
it: a client that would otherwise wait or be refused preempts it (its calls are cancelled),
and host pressure within a shedding window of background work stops that work instead of
refusing clients. So background work never causes a client's 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from serve_app.config import Admission, RouteLimits, Shedding
from serve_app.http import sse
from serve_app.http.suspects import Suspects, crashed_replica, digest
from serve_app.metrics import host_metrics, route_metrics
from serve_app.protocol.errors import REPLICA_FAILURES, APIError

T = TypeVar("T")
logger = logging.getLogger("ray.serve")
Response = DeploymentResponse | DeploymentResponseGenerator


def overloaded(route: str, reason: str, retry_after_s: int) -> APIError:
    """503 with a Retry-After drawn between `retry_after_s` and twice that, so clients refused
    together do not all come back in the same instant."""
    messages = {
        "queue_full": f"The {route} route is at its limit; retry shortly.",
        "resource_pressure": f"The server is under memory or CPU pressure; {route} is paused.",
        "queue_wait": f"The {route} route's queue is waiting too long; retry shortly.",
    }
    return APIError(
        503,
        messages[reason],
        type="overloaded",
        code=reason,
        headers={"Retry-After": str(random.randint(retry_after_s, 2 * retry_after_s))},
    )


async def all_within(timeout_s: float, calls: list[Response], *others: Awaitable[Any]) -> list[Any]:
    """The results of the handle `calls`, then of `others`, within `timeout_s`: on a timeout
    or a failure it raises, and the calls still running are cancelled, so a probe that gives
    up leaves no work behind on the replicas."""
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.gather(*calls, *others)
    except BaseException:
        for call in calls:
            call.cancel()
        raise


def deadline_exceeded(route: str, deadline_s: float) -> APIError:
    return APIError(
        504, f"The {route} request passed its {deadline_s:g} s deadline.", "timeout", code="timeout"
    )


class StallShare:
    """The share of wall time (percent) by which a cumulative microsecond counter grew, over a
    sliding window. After a gap longer than the window it starts again from the next sample,
    so work done before the window (model loading at start-up) never counts."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, total_us: float | None, window_s: float) -> float | None:
        if total_us is None:
            return None
        self.samples.append((now, total_us))
        while self.samples[0][0] < now - window_s:
            self.samples.popleft()
        start, first = self.samples[0]
        if now <= start:
            return 0.0
        return max(0.0, min(100.0, (total_us - first) / 1e4 / (now - start)))


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError:
        return None


def stall_total(path: Path | None) -> float | None:
    """Microseconds in which some task stalled, from a PSI file's `some` line (None: absent)."""
    for line in (_read(path) or "").splitlines():
        kind, *fields = line.split() or [""]
        if kind == "some":
            return float(dict(f.split("=", 1) for f in fields)["total"])
    return None


def keyed(path: Path | None) -> dict[str, int]:
    """`key value` lines (cpu.stat, memory.stat; /proc/meminfo with its `:` and `kB`)."""
    values = {}
    for line in (_read(path) or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1]) * (1024 if parts[2:] == ["kB"] else 1)
    return values


@dataclass(frozen=True)
class PressureSources:
    """Where the figures are read: this process's own cgroup v2 folder where there is one
    (a container's limits and stalls, not the host's), else /proc. Injectable for tests."""

    proc: Path = Path("/proc")
    cgroup: Path | None = None

    @classmethod
    def detect(
        cls, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
    ) -> PressureSources:
        """The cgroup v2 folder named by the `0::` line of /proc/self/cgroup, on a unified
        mount or a hybrid one's `unified/`; None where there is no cgroup v2."""
        for line in (_read(proc / "self" / "cgroup") or "").splitlines():
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
                for root in (cgroup_root, cgroup_root / "unified"):
                    folder = root / own
                    if (folder / "cgroup.controllers").exists() or (
                        folder / "cpu.pressure"
                    ).exists():
                        return cls(proc, folder)
        return cls(proc, None)

    def pressure(self, resource: str) -> Path:
        """The cgroup's own PSI file where it has one, else the host's."""
        if self.cgroup is not None and (self.cgroup / f"{resource}.pressure").exists():
            return self.cgroup / f"{resource}.pressure"
        return self.proc / "pressure" / resource

    def throttled_us(self) -> float | None:
        """Microseconds the cgroup's CPU quota (cpu.max) held it back."""
        if self.cgroup is None:
            return None
        value = keyed(self.cgroup / "cpu.stat").get("throttled_usec")
        return None if value is None else float(value)

    def memory_percent(self) -> float | None:
        """Memory in use, page cache excluded: of the cgroup's limit where it has one (its
        inactive file pages are reclaimable, as the kubelet counts them), else of the host."""
        limit = (_read(self.cgroup / "memory.max") or "max").strip() if self.cgroup else "max"
        current = _read(self.cgroup / "memory.current") if self.cgroup else None
        if limit.isdigit() and current is not None and current.strip().isdigit():
            inactive = keyed(self.cgroup / "memory.stat").get("inactive_file", 0)
            return 100.0 * max(0, int(current) - inactive) / int(limit)
        meminfo = keyed(self.proc / "meminfo")
        total, available = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
        if not total or available is None:
            return None
        return 100.0 * (total - available) / total


class HostPressure:
    """Memory use and stalls, CPU stalls, sampled at most once an interval.

    `sample()` says whether memory is short (every `shed` route refuses: running short of it
    kills replicas); `cpu_stalled` whether CPU stalls refuse `shed` requests that would queue.
    """

    def __init__(
        self,
        shedding: Shedding,
        sources: PressureSources | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shedding = shedding
        self.sources = sources or PressureSources.detect()
        self.clock = clock
        self.cpu_psi, self.throttling, self.memory_psi = StallShare(), StallShare(), StallShare()
        self.sampled_at: float | None = None
        self.memory_percent: float | None = None
        self.memory_stall_percent: float | None = None
        self.cpu_stall_percent: float | None = None
        self.active = False
        self.cpu_stalled = False

    def sample(self) -> bool:
        """Whether memory is short now: `shed` routes refuse every request."""
        now = self.clock()
        if self.sampled_at is not None and now - self.sampled_at < self.shedding.interval_s:
            return self.active
        self.sampled_at = now
        window, sources = self.shedding.window_s, self.sources
        cpu = [
            self.cpu_psi.add(now, stall_total(sources.pressure("cpu")), window),
            self.throttling.add(now, sources.throttled_us(), window),
        ]
        known = [share for share in cpu if share is not None]
        self.cpu_stall_percent = max(known) if known else None
        memory_stall = stall_total(sources.pressure("memory"))
        self.memory_stall_percent = self.memory_psi.add(now, memory_stall, window)
        self.memory_percent = sources.memory_percent()
        shedding = self.shedding
        self.active = (self.memory_percent or 0.0) > shedding.memory_percent or (
            self.memory_stall_percent or 0.0
        ) > shedding.memory_stall_percent
        self.cpu_stalled = (self.cpu_stall_percent or 0.0) > shedding.cpu_stall_percent
        gauges = host_metrics()
        gauges.cpu_stall_percent.set(self.cpu_stall_percent or 0.0)
        gauges.memory_stall_percent.set(self.memory_stall_percent or 0.0)
        gauges.memory_percent.set(self.memory_percent or 0.0)
        gauges.shedding.set(float(self.active))
        return self.active

    def report(self) -> dict[str, Any]:
        self.sample()

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "memory_percent": rounded(self.memory_percent),
            "memory_stall_percent": rounded(self.memory_stall_percent),
            "cpu_stall_percent": rounded(self.cpu_stall_percent),
            "active": self.active,
            "cpu_stalled": self.cpu_stalled,
            "cgroup": None if self.sources.cgroup is None else str(self.sources.cgroup),
            "limits": self.shedding.model_dump(),
        }


@dataclass
class Waiter:
    """A queued request: resolved when a slot is handed to it."""

    future: asyncio.Future
    since: float  # when it started waiting, by the gate's clock


@dataclass
class Gate:
    """One route's slots and FIFO queue. A freed slot passes straight to the next waiter."""

    route: str
    limits: RouteLimits
    clock: Callable[[], float] = time.monotonic
    running: int = 0
    waiters: deque[Waiter] = field(default_factory=deque)
    admitted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    timed_out: int = 0
    background: set[Ticket] = field(default_factory=set)
    background_ended: float = -float("inf")  # monotonic time the last background ticket ended
    preempted: int = 0
    suspects: Suspects = field(default_factory=Suspects)  # requests implicated in replica deaths

    def full(self) -> bool:
        return self.running >= self.limits.max_running and len(self.waiters) >= (
            self.limits.max_queued
        )

    def busy(self) -> bool:
        """Whether a request arriving now would have to wait for a slot."""
        return self.running >= self.limits.max_running or bool(self.waiters)

    def oldest_wait(self) -> float:
        """Seconds the first request in the queue has waited (0 with none queued)."""
        return self.clock() - self.waiters[0].since if self.waiters else 0.0

    async def acquire(self, deadline: float) -> None:
        """A slot, waiting for one until `deadline` (TimeoutError); call `full()` first."""
        if self.running < self.limits.max_running and not self.waiters:
            self.running += 1
            self._publish()
            route_metrics().queue_wait_ms.observe(0.0, tags={"route": self.route})
            return
        waiter = Waiter(asyncio.get_running_loop().create_future(), self.clock())
        self.waiters.append(waiter)
        self._publish()
        try:
            async with asyncio.timeout_at(deadline):
                await waiter.future
            waited_ms = (self.clock() - waiter.since) * 1000
            route_metrics().queue_wait_ms.observe(waited_ms, tags={"route": self.route})
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # a slot was handed over as the wait ended: pass it on
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            raise
        finally:
            self._publish()

    def release(self) -> None:
        while self.waiters and self.running <= self.limits.max_running:
            waiter = self.waiters.popleft().future
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
        self._publish()

    def resize(self, limits: RouteLimits) -> None:
        """New limits in place; waiters take any slots the change opened."""
        self.limits = limits
        while self.waiters and self.running < limits.max_running:
            waiter = self.waiters.popleft().future
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)
        self._publish()

    def count(self, outcome: str, reason: str | None = None) -> None:
        metrics = route_metrics()
        tags = {"route": self.route}
        if outcome == "admitted":
            self.admitted += 1
            metrics.admitted.inc(tags=tags)
        elif outcome == "rejected":
            assert reason is not None
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            metrics.rejected.inc(tags={**tags, "reason": reason})
        else:
            self.timed_out += 1
            metrics.timed_out.inc(tags=tags)

    def _publish(self) -> None:
        metrics = route_metrics()
        metrics.running.set(self.running, tags={"route": self.route})
        metrics.queued.set(len(self.waiters), tags={"route": self.route})

    def report(self) -> dict[str, Any]:
        return {
            **self.limits.model_dump(),
            "running": self.running,
            "queued": len(self.waiters),
            "oldest_wait_s": round(self.oldest_wait(), 3),
            "admitted": self.admitted,
            "rejected": dict(self.rejected),
            "timed_out": self.timed_out,
            "background": len(self.background),
            "preempted": self.preempted,
        }


class Ticket:
    """An admitted request: its slot, its deadline, and the model calls to cancel at it."""

    def __init__(self, gate: Gate, deadline: float, background: bool = False) -> None:
        self.gate = gate
        self.deadline = deadline
        self.calls: list[Response] = []
        self.released = False
        self.streaming = False
        self.background = background
        self.preempted = False

    def track(self, response: Response) -> Response:
        """Remember a handle call, to cancel it if the deadline passes."""
        self.calls.append(response)
        return response

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`, bounded by the deadline: 504 and the calls cancelled when it passes."""
        try:
            async with asyncio.timeout_at(self.deadline):
                return await awaitable
        except TimeoutError:
            raise self.expire() from None

    async def result(self, response: DeploymentResponse) -> Any:
        """The result of a handle call, bounded by the deadline."""
        return await self.wait(self.track(response))

    async def call(self, make: Callable[[], DeploymentResponse], request: Any) -> Any:
        """The result of the idempotent handle call `make()` for `request`, bounded by the
        deadline. If the replica serving it dies, the call is made once more; Serve routes it
        to a live one (or to the replacement it starts), so the client sees no failure.

        Unless the request itself is what kills replicas: a request implicated in two replica
        deaths is not called again, and is refused with 422 (suspects.py)."""
        suspects, route = self.gate.suspects, self.gate.route
        key = digest(route, request) if len(suspects) else None  # no cost while none died
        if key is not None and suspects.condemned(key):
            raise crashed_replica(route)
        started = suspects.clock()
        try:
            result = await self.result(make())
        except REPLICA_FAILURES as exc:
            key = key or digest(route, request)
            if suspects.died(key, started):
                raise crashed_replica(route) from exc
            logger.warning("%s: replica failed (%s); calling again", route, type(exc))
            route_metrics().retried.inc(tags={"route": route})
            started = suspects.clock()
            try:
                result = await self.result(make())
            except REPLICA_FAILURES as again:
                if suspects.died(key, started):
                    raise crashed_replica(route) from again
                raise
        if len(suspects):  # it succeeded: the deaths it was implicated in were not its doing
            suspects.cleared(key or digest(route, request))
        return result

    def stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Server-sent `events` until they end, or an error event when the deadline passes.

        The stream owns the slot from here: it frees it when it ends, or when it is dropped
        unread (a client gone before the first byte).
        """
        self.streaming = True
        stream = self._stream(events)
        weakref.finalize(stream, self.release)
        return stream

    async def _stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        ended = False
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        event = await anext(events)
                except StopAsyncIteration:
                    ended = True
                    return
                except TimeoutError:
                    yield sse.error_event(self.expire())
                    yield sse.DONE
                    ended = True
                    return
                yield event
        finally:
            if not ended:  # the client left mid-stream
                self.cancel()
            self.release()

    def cancel(self) -> None:
        """Cancel the model calls still running (the deadline passed, or the client left)."""
        for call in self.calls:
            call.cancel()

    def expire(self) -> APIError:
        self.cancel()
        self.gate.count("timed_out")
        return deadline_exceeded(self.gate.route, self.gate.limits.deadline_s)

    def preempt(self) -> None:
        """Give a background ticket's slot to a client now; its calls are cancelled."""
        self.preempted = True
        self.gate.preempted += 1
        self.cancel()
        self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.background:
                self.gate.background.discard(self)
                self.gate.background_ended = self.gate.clock()
            self.gate.release()


# The route each POST path is admitted on: a request to a full route is refused from its head
# alone (AdmissionControl.refuse_early), before its body is read or parsed.
POST_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/rag/query": "rag",
    "/v1/embeddings": "embeddings",
    "/v1/rerank": "rerank",
    "/rerank": "rerank",
    "/v1/classify": "classify",
    "/v1/search": "search",
    "/v1/documents": "ingest",
}


class AdmissionControl:
    """The gates of every route and the host pressure monitor, configured by `Admission`."""

    def __init__(
        self,
        admission: Admission,
        sources: PressureSources | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.gates = {
            route: Gate(route, limits, clock) for route, limits in admission.routes.items()
        }
        self.pressure = HostPressure(admission.shedding, sources, clock)

    def configure(self, admission: Admission) -> None:
        self.pressure.shedding = admission.shedding
        for route, limits in admission.routes.items():
            self.gates[route].resize(limits)

    @asynccontextmanager
    async def admit(self, route: str) -> AsyncIterator[Ticket]:
        """Hold a slot of `route` for the block, or for the stream the block hands it to."""
        ticket = await self.enter(route)
        try:
            yield ticket
        except asyncio.CancelledError:  # the client left
            ticket.cancel()
            raise
        finally:
            if not ticket.streaming:
                ticket.release()

    async def enter(self, route: str) -> Ticket:
        """A ticket for `route`, or 503 at once, or 504 if the deadline passes while queued."""
        gate = self.gates[route]
        deadline = asyncio.get_running_loop().time() + gate.limits.deadline_s
        if gate.background and gate.running >= gate.limits.max_running:
            next(iter(gate.background)).preempt()  # the client takes its slot
        reason = self._refusal(gate)
        if reason is not None:
            gate.count("rejected", reason)
            raise overloaded(route, reason, gate.limits.retry_after_s)
        try:
            await gate.acquire(deadline)
        except TimeoutError:
            gate.count("timed_out")
            raise deadline_exceeded(route, gate.limits.deadline_s) from None
        gate.count("admitted")
        return Ticket(gate, deadline)

    def refuse_early(self, method: str, path: str) -> APIError | None:
        """503 `queue_full` for a POST to a route with every slot and queue place taken and no
        background work to give way, or None. The Guard asks before reading the body, so a
        burst against a full route costs each refused request its head only; `enter` makes
        the same decision for the requests that get past this."""
        route = POST_ROUTES.get(path) if method == "POST" else None
        gate = self.gates.get(route) if route is not None else None
        if gate is None or gate.background or not gate.full():
            return None
        gate.count("rejected", "queue_full")
        return overloaded(gate.route, "queue_full", gate.limits.retry_after_s)

    def _refusal(self, gate: Gate) -> str | None:
        """Why a request arriving at `gate` now is refused, or None to admit or queue it.

        resource_pressure: a `shed` route while memory is short, or while CPU stalls and the
        request would have to queue; queue_full: no slot and no room in the queue;
        queue_wait: the queue's oldest request has used `queue_wait_fraction` of its deadline
        waiting, so a newcomer would likely spend its whole deadline queued.
        """
        pressure = self.pressure
        if gate.limits.shed and (pressure.sample() or (pressure.cpu_stalled and gate.busy())):
            if not self._background_recent():
                return "resource_pressure"
            # The pressure may be background work's own: that work stops, clients run.
            for ticket in [t for g in self.gates.values() for t in g.background]:
                ticket.preempt()
        if gate.full():
            return "queue_full"
        if gate.oldest_wait() > pressure.shedding.queue_wait_fraction * gate.limits.deadline_s:
            return "queue_wait"
        return None

    def background(self, route: str) -> Ticket | None:
        """A background ticket for `route` if a slot is free, nobody waits and the host is
        under no pressure (memory or CPU stalls); else None. Release it when done; a client
        may preempt it."""
        gate = self.gates[route]
        if gate.busy() or self.pressure.sample() or self.pressure.cpu_stalled:
            return None
        gate.running += 1
        gate._publish()
        deadline = asyncio.get_running_loop().time() + gate.limits.deadline_s
        ticket = Ticket(gate, deadline, background=True)
        gate.background.add(ticket)
        return ticket

    def _background_recent(self) -> bool:
        """Whether background work ran within the stall measuring window."""
        since = self.clock() - self.pressure.shedding.window_s
        return any(g.background or g.background_ended > since for g in self.gates.values())

    def report(self) -> dict[str, Any]:
        return {
            "routes": {route: gate.report() for route, gate in self.gates.items()},
            "shedding": self.pressure.report(),
        }
