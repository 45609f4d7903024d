"""The Precompute job's hand-off without a cluster: a due pass goes to the first ingress
replica that asks, which computes the stale answers and reports how it went."""

import asyncio

import pytest

from serve_app.config import AppConfig
from serve_app.precompute import job as job_module
from serve_app.precompute.store import Ranked
from serve_app.precompute.work import work_through

pytestmark = pytest.mark.anyio  # the async tests run on asyncio (anyio's pytest plugin)


def ranked(key: str, answer_version: int | None) -> Ranked:
    age = None if answer_version is None else 1.0
    request = {"query": key}
    return Ranked(1, "docs", 2, "search", key, request, 5, answer_version, age)


class Store:
    """The counts and answers tables: two ranked requests, one of them answered and fresh."""

    def __init__(self) -> None:
        self.entries = [ranked("stale", None), ranked("fresh", 2), ranked("old", 1)]
        self.put_bodies: dict[str, dict] = {}

    async def ranked(self, kinds, top_n, min_count, window_s):
        return self.entries

    async def prune(self, keep, window_s):
        return 1

    async def put(self, entry, body):
        self.put_bodies[entry.key] = body


@pytest.fixture
async def job(monkeypatch):
    store = Store()

    async def open_store(config, name):
        return None

    monkeypatch.setattr(job_module, "open_store", open_store)
    monkeypatch.setattr(job_module, "PopularStore", lambda pool: store)
    precompute = object.__new__(job_module.Precompute.func_or_class)
    await precompute.__init__(AppConfig())
    yield precompute
    precompute.loop.cancel()


async def test_a_pass_is_computed_by_the_first_replica_that_asks(job):
    assert await job.take(0.01) is None  # nothing due
    running = asyncio.ensure_future(job.run())
    await asyncio.sleep(0)
    first, second = await asyncio.gather(job.take(1), job.take(1))
    work = first or second
    assert (first is None) != (second is None)  # one taker only
    assert [e.key for e in work.entries] == ["stale", "old"]  # the fresh one is left alone

    async def compute(kind, request):
        return {"answer": request["query"], "collection": request["collection"]}

    outcome = await work_through(work, compute, job.store)
    job.finish(work.number, outcome)
    report = await running
    assert {k: report[k] for k in ("ranked", "fresh", "computed", "busy", "pruned")} == {
        "ranked": 3,
        "fresh": 1,
        "computed": 2,
        "busy": 0,
        "pruned": 1,
    }
    assert job.store.put_bodies["stale"] == {"answer": "stale", "collection": "docs"}
    assert job.report()["totals"]["computed"] == 2


async def test_a_busy_route_stops_the_pass(job):
    running = asyncio.ensure_future(job.run())
    await asyncio.sleep(0)
    work = await job.take(1)
    calls = []

    async def busy(kind, request):
        calls.append(request["query"])
        return None

    job.finish(work.number, await work_through(work, busy, job.store))
    report = await running
    assert calls == ["stale"] and report["busy"] == 1 and report["computed"] == 0


async def test_a_failing_request_is_skipped(job):
    running = asyncio.ensure_future(job.run())
    await asyncio.sleep(0)
    work = await job.take(1)

    async def failing_first(kind, request):
        if request["query"] == "stale":
            raise RuntimeError("a removed model")
        return {"answer": "ok"}

    job.finish(work.number, await work_through(work, failing_first, job.store))
    report = await running
    assert report["failed"] == 1 and report["computed"] == 1


async def test_a_report_for_another_pass_is_ignored(job):
    running = asyncio.ensure_future(job.run())
    await asyncio.sleep(0)
    work = await job.take(1)
    job.finish(work.number + 1, {"computed": 9})
    await asyncio.sleep(0)
    assert not running.done()
    job.finish(work.number, {"computed": 2})
    assert (await running)["computed"] == 2
