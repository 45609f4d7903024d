"""A route's `Gate` and its `Ticket`s without a cluster: slot hand-over, FIFO order, resizing,
deadlines, streams that own their slot, and background work that a client preempts."""

import asyncio
import gc

import pytest

from serve_app.config import Admission, RouteLimits, overlay
from serve_app.http import sse
from serve_app.http.admission import AdmissionControl, Gate, PressureSources, Ticket
from serve_app.protocol.errors import APIError

pytestmark = pytest.mark.anyio  # the async tests run on asyncio (anyio's pytest plugin)


def gate(max_running: int = 1, max_queued: int = 8, deadline_s: float = 10.0) -> Gate:
    return Gate(
        "chat", RouteLimits(max_running=max_running, max_queued=max_queued, deadline_s=deadline_s)
    )


def later(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def queued(gate: Gate, name: str, order: list[str]) -> None:
    await gate.acquire(later(10))
    order.append(name)


class Call:
    """A handle call that records its cancellation."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def control(tmp_path, max_running: int = 1, max_queued: int = 0, deadline_s: float = 10.0):
    """Admission on a host without pressure sources (which never sheds)."""
    limits = {"max_running": max_running, "max_queued": max_queued, "deadline_s": deadline_s}
    admission = overlay(Admission(), {"routes": {"rag": limits}})
    return AdmissionControl(admission, PressureSources(proc=tmp_path / "absent"))


async def test_a_freed_slot_passes_straight_to_the_next_waiter():
    g = gate()
    await g.acquire(later(10))
    order: list[str] = []
    waiting = asyncio.ensure_future(queued(g, "next", order))
    await asyncio.sleep(0)
    assert g.running == 1 and len(g.waiters) == 1
    g.release()  # handed over: the count never drops, so no newcomer can take the slot
    assert g.running == 1 and not g.waiters
    assert not g.full() and g.busy()
    await waiting
    assert order == ["next"]
    g.release()
    assert g.running == 0 and not g.busy()


async def test_waiters_are_served_in_arrival_order():
    g = gate()
    await g.acquire(later(10))
    order: list[str] = []
    tasks = []
    for name in ("a", "b", "c"):
        tasks.append(asyncio.ensure_future(queued(g, name, order)))
        await asyncio.sleep(0)
    for _ in tasks:
        g.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]
    assert g.running == 1


async def test_a_waiter_that_leaves_gives_up_its_place_not_a_slot():
    g = gate()
    await g.acquire(later(10))
    order: list[str] = []
    leaving = asyncio.ensure_future(queued(g, "left", order))
    await asyncio.sleep(0)
    staying = asyncio.ensure_future(queued(g, "stayed", order))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert len(g.waiters) == 1
    g.release()
    await staying
    assert order == ["stayed"] and g.running == 1


async def test_a_full_queue_is_full_only_with_every_slot_taken():
    g = gate(max_running=1, max_queued=1)
    await g.acquire(later(10))
    assert not g.full()
    waiting = asyncio.ensure_future(g.acquire(later(10)))
    await asyncio.sleep(0)
    assert g.full()
    g.release()
    await waiting
    assert not g.full()


async def test_growing_the_limit_admits_waiters_at_once():
    g = gate(max_running=1)
    await g.acquire(later(10))
    tasks = [asyncio.ensure_future(g.acquire(later(10))) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(g.waiters) == 3
    g.resize(RouteLimits(max_running=3, max_queued=8, deadline_s=10))
    await asyncio.sleep(0)
    assert g.running == 3 and len(g.waiters) == 1
    assert sum(t.done() for t in tasks) == 2
    g.release()
    await asyncio.gather(*tasks)
    assert g.running == 3 and not g.waiters


async def test_shrinking_the_limit_hands_no_slot_over_until_under_it():
    g = gate(max_running=3)
    for _ in range(3):
        await g.acquire(later(10))
    g.resize(RouteLimits(max_running=1, max_queued=8, deadline_s=10))
    waiting = asyncio.ensure_future(g.acquire(later(10)))
    await asyncio.sleep(0)
    g.release()
    g.release()
    await asyncio.sleep(0)
    assert not waiting.done() and g.running == 1
    g.release()  # now at the new limit: this slot goes to the waiter
    await waiting
    assert g.running == 1


async def test_a_wait_past_the_deadline_leaves_the_queue():
    g = gate()
    await g.acquire(later(10))
    with pytest.raises(TimeoutError):
        await g.acquire(later(0.01))
    assert not g.waiters and g.running == 1


async def test_queued_past_the_deadline_is_a_504(tmp_path):
    admission = control(tmp_path, max_running=1, max_queued=1, deadline_s=0.05)
    held = await admission.enter("rag")
    with pytest.raises(APIError) as late:
        await admission.enter("rag")
    assert late.value.status == 504 and late.value.body.code == "timeout"
    report = admission.gates["rag"].report()
    assert report["timed_out"] == 1 and report["queued"] == 0
    held.release()
    assert admission.gates["rag"].running == 0


async def test_a_call_past_the_deadline_is_a_504_and_cancelled():
    g = gate()
    await g.acquire(later(10))
    ticket = Ticket(g, later(0.02))
    call = ticket.track(Call())
    with pytest.raises(APIError) as late:
        await ticket.wait(asyncio.sleep(1))
    assert late.value.status == 504 and call.cancelled
    assert g.timed_out == 1
    ticket.release()
    ticket.release()  # a second release frees nothing more
    assert g.running == 0


async def events(texts: list[str], pause_s: float = 0.0):
    for text in texts:
        await asyncio.sleep(pause_s)
        yield sse.frame(text)


async def test_a_stream_holds_its_slot_until_it_ends(tmp_path):
    admission = control(tmp_path)
    async with admission.admit("rag") as ticket:
        stream = ticket.stream(events(["a", "b"]))
    gate_ = admission.gates["rag"]
    assert gate_.running == 1  # the block ended; the stream owns the slot
    assert [e async for e in stream] == ["data: a\n\n", "data: b\n\n"]
    assert gate_.running == 0


async def test_a_stream_past_its_deadline_ends_with_an_error_event(tmp_path):
    admission = control(tmp_path, deadline_s=0.05)
    async with admission.admit("rag") as ticket:
        call = ticket.track(Call())
        stream = ticket.stream(events(["a", "b"], pause_s=0.2))
    sent = [e async for e in stream]
    assert sent[-1] == sse.DONE and '"code":"timeout"' in sent[0]
    assert call.cancelled and admission.gates["rag"].running == 0


async def test_a_stream_never_read_frees_its_slot(tmp_path):
    admission = control(tmp_path)
    async with admission.admit("rag") as ticket:
        stream = ticket.stream(events(["a"]))
    assert admission.gates["rag"].running == 1
    del stream
    gc.collect()
    assert admission.gates["rag"].running == 0


async def test_a_client_leaving_mid_stream_cancels_the_calls(tmp_path):
    admission = control(tmp_path)
    async with admission.admit("rag") as ticket:
        call = ticket.track(Call())
        stream = ticket.stream(events(["a", "b", "c"]))
    assert await anext(stream) == "data: a\n\n"
    await stream.aclose()
    assert call.cancelled and admission.gates["rag"].running == 0


async def test_background_work_takes_only_a_free_slot_and_yields_it(tmp_path):
    admission = control(tmp_path, max_running=1, max_queued=0)
    gate_ = admission.gates["rag"]
    background = admission.background("rag")
    assert background is not None and gate_.running == 1
    assert admission.background("rag") is None  # no free slot
    call = background.track(Call())
    client = await admission.enter("rag")  # no queue, yet not a 503: it takes the slot
    assert background.preempted and call.cancelled
    assert gate_.preempted == 1 and gate_.running == 1 and not gate_.background
    background.release()  # the job's own release after preemption frees nothing more
    assert gate_.running == 1
    client.release()
    assert gate_.running == 0
    assert gate_.report()["rejected"] == {}


async def test_background_work_never_jumps_the_queue(tmp_path):
    admission = control(tmp_path, max_running=1, max_queued=2)
    held = await admission.enter("rag")
    waiting = asyncio.ensure_future(admission.enter("rag"))
    await asyncio.sleep(0)
    assert admission.background("rag") is None
    held.release()
    (await waiting).release()
    ticket = admission.background("rag")
    assert ticket is not None
    ticket.release()
    assert admission.gates["rag"].running == 0 and admission.gates["rag"].background_ended > 0


async def test_a_full_route_is_refused_from_the_head_and_only_then(tmp_path):
    admission = control(tmp_path, max_running=1, max_queued=1)
    assert admission.refuse_early("POST", "/v1/rag/query") is None  # free
    ticket = await admission.enter("rag")
    assert admission.refuse_early("POST", "/v1/rag/query") is None  # a queue place left
    waiting = asyncio.ensure_future(admission.enter("rag"))
    await asyncio.sleep(0)
    refused = admission.refuse_early("POST", "/v1/rag/query")
    assert refused is not None and refused.status == 503
    assert refused.body.code == "queue_full" and "Retry-After" in refused.headers
    assert admission.gates["rag"].report()["rejected"] == {"queue_full": 1}
    # Other methods, paths and routes are left to the route.
    assert admission.refuse_early("GET", "/v1/rag/query") is None
    assert admission.refuse_early("POST", "/v1/search") is None
    assert admission.refuse_early("POST", "/v1/unknown") is None
    ticket.release()
    (await waiting).release()
    assert admission.refuse_early("POST", "/v1/rag/query") is None


async def test_background_work_gives_way_instead_of_an_early_refusal(tmp_path):
    admission = control(tmp_path, max_running=1, max_queued=0)
    background = admission.background("rag")
    assert background is not None and admission.gates["rag"].full()
    assert admission.refuse_early("POST", "/v1/rag/query") is None  # enter() preempts it
    ticket = await admission.enter("rag")
    assert background.preempted
    ticket.release()
