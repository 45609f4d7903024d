"""Per-route admission control in the ingress: limits, queues, deadlines and load shedding.

A request asks its route's `Gate` for a slot. It runs at once if fewer than `max_running`
are running, waits in a FIFO queue if fewer than `max_queued` wait, and otherwise is refused
at once with 503 `overloaded` and `Retry-After`. Heavy routes are also refused while the host
is under CPU or memory pressure. A request's deadline counts from arrival: one still waiting
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
from typing import Any, TypeVar

import psutil
from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from serve_app.config import Admission, RouteLimits, Shedding
from serve_app.metrics import host_metrics, route_metrics
from serve_app.protocol.errors import REPLICA_FAILURES, APIError, sse_event

T = TypeVar("T")
logger = logging.getLogger("ray.serve")
Response = DeploymentResponse | DeploymentResponseGenerator


def overloaded(route: str, reason: str, retry_after_s: int) -> APIError:
    """503 with a Retry-After drawn between `retry_after_s` and twice that, so clients refused
    together do not all come back in the same instant."""
    messages = {
        "queue_full": f"The {route} route is at its limit; retry shortly.",
        "resource_pressure": f"The server is under memory or CPU pressure; {route} is paused.",
    }
    return APIError(
        503,
        messages[reason],
        type="overloaded",
        code=reason,
        headers={"Retry-After": str(random.randint(retry_after_s, 2 * retry_after_s))},
    )


def deadline_exceeded(route: str, deadline_s: float) -> APIError:
    return APIError(
        504, f"The {route} request passed its {deadline_s:g} s deadline.", "timeout", code="timeout"
    )


class HostPressure:
    """Host CPU (averaged over a window) and memory use, sampled at most once an interval."""

    def __init__(self, shedding: Shedding) -> None:
        self.shedding = shedding
        self.cpu_samples: deque[tuple[float, float, float]] = deque()  # (time, percent, span)
        self.last = time.monotonic()
        self.cpu_percent = 0.0
        self.memory_percent = 0.0
        self.active = False
        psutil.cpu_percent(None)  # starts the first measuring interval

    def sample(self) -> bool:
        """Whether heavy routes are refused now."""
        now = time.monotonic()
        if now - self.last < self.shedding.interval_s:
            return self.active
        self.cpu_samples.append((now, psutil.cpu_percent(None), now - self.last))
        self.last = now
        while self.cpu_samples and self.cpu_samples[0][0] < now - self.shedding.window_s:
            self.cpu_samples.popleft()
        spans = sum(span for _, _, span in self.cpu_samples)
        self.cpu_percent = sum(p * span for _, p, span in self.cpu_samples) / spans
        self.memory_percent = psutil.virtual_memory().percent
        self.active = (
            self.cpu_percent > self.shedding.cpu_percent
            or self.memory_percent > self.shedding.memory_percent
        )
        gauges = host_metrics()
        gauges.cpu_percent.set(self.cpu_percent)
        gauges.memory_percent.set(self.memory_percent)
        gauges.shedding.set(float(self.active))
        return self.active

    def report(self) -> dict[str, Any]:
        self.sample()
        return {
            "cpu_percent": round(self.cpu_percent, 1),
            "memory_percent": round(self.memory_percent, 1),
            "active": self.active,
            "limits": self.shedding.model_dump(),
        }


@dataclass
class Gate:
    """One route's slots and FIFO queue. A freed slot passes straight to the next waiter."""

    route: str
    limits: RouteLimits
    running: int = 0
    waiters: deque[asyncio.Future] = field(default_factory=deque)
    admitted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    timed_out: int = 0
    background: set[Ticket] = field(default_factory=set)
    background_ended: float = -float("inf")  # monotonic time the last background ticket ended
    preempted: int = 0

    def full(self) -> bool:
        return self.running >= self.limits.max_running and len(self.waiters) >= (
            self.limits.max_queued
        )

    async def acquire(self, deadline: float) -> None:
        """A slot, waiting for one until `deadline` (TimeoutError); call `full()` first."""
        if self.running < self.limits.max_running and not self.waiters:
            self.running += 1
            self._publish()
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self._publish()
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over as the wait ended: pass it on
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            raise
        finally:
            self._publish()

    def release(self) -> None:
        while self.waiters and self.running <= self.limits.max_running:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
        self._publish()

    def resize(self, limits: RouteLimits) -> None:
        """New limits in place; waiters take any slots the change opened."""
        self.limits = limits
        while self.waiters and self.running < limits.max_running:
            waiter = self.waiters.popleft()
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

    async def call(self, make: Callable[[], DeploymentResponse]) -> Any:
        """The result of the idempotent handle call `make()`, bounded by the deadline. If the
        replica serving it dies, the call is made once more; Serve routes it to a live one
        (or to the replacement it starts), so the client sees no failure."""
        try:
            return await self.result(make())
        except REPLICA_FAILURES as exc:
            logger.warning("%s: replica failed (%s); calling again", self.gate.route, type(exc))
            route_metrics().retried.inc(tags={"route": self.gate.route})
            return await self.result(make())

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
                    yield sse_event(self.expire())
                    yield "data: [DONE]\n\n"
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
                self.gate.background_ended = time.monotonic()
            self.gate.release()


class AdmissionControl:
    """The gates of every route and the host pressure monitor, configured by `Admission`."""

    def __init__(self, admission: Admission) -> None:
        self.gates = {route: Gate(route, limits) for route, limits in admission.routes.items()}
        self.pressure = HostPressure(admission.shedding)

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
        reason = None
        if gate.limits.shed and self.pressure.sample():
            if self._background_recent():
                # The pressure may be background work's own: that work stops, clients run.
                for ticket in [t for g in self.gates.values() for t in g.background]:
                    ticket.preempt()
            else:
                reason = "resource_pressure"
        if reason is None and gate.full():
            reason = "queue_full"
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

    def background(self, route: str) -> Ticket | None:
        """A background ticket for `route` if a slot is free, nobody waits and the host is
        not under pressure; else None. Release it when done; a client may preempt it."""
        gate = self.gates[route]
        if gate.waiters or gate.running >= gate.limits.max_running or self.pressure.sample():
            return None
        gate.running += 1
        gate._publish()
        deadline = asyncio.get_running_loop().time() + gate.limits.deadline_s
        ticket = Ticket(gate, deadline, background=True)
        gate.background.add(ticket)
        return ticket

    def _background_recent(self) -> bool:
        """Whether background work ran within the CPU averaging window."""
        since = time.monotonic() - self.pressure.shedding.window_s
        return any(g.background or g.background_ended > since for g in self.gates.values())

    def report(self) -> dict[str, Any]:
        return {
            "routes": {route: gate.report() for route, gate in self.gates.items()},
            "shedding": self.pressure.report(),
        }
