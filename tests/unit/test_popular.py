"""Popular queries without a cluster: keys, counting, the in-memory answers and background
admission (a client always takes the slot of background work)."""

from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest

from serve_app.config import Admission, PrecomputeConfig, overlay
from serve_app.errors import InvalidData, StoreUnavailable
from serve_app.http.admission import AdmissionControl
from serve_app.precompute.answers import PrecomputedAnswers
from serve_app.precompute.counter import MAX_COUNTED_BYTES, QueryCounter
from serve_app.precompute.keys import ask, normalize
from serve_app.precompute.popular import Popular
from serve_app.precompute.store import Answer, PopularStore
from serve_app.protocol.documents import RagRequest, SearchRequest
from serve_app.protocol.errors import APIError

pytestmark = pytest.mark.anyio  # the async tests run on asyncio (anyio's pytest plugin)


def test_normalize_folds_case_width_and_space():
    assert normalize("  What is\tHNSW?\n") == "what is hnsw?"
    assert normalize("\uff28\uff2e\uff33\uff37") == "hnsw"  # full-width letters (NFKC)
    assert normalize("Straße") == normalize("STRASSE")


def test_ask_matches_normalized_requests_only():
    def key(kind="search", models="m", **fields):
        body = {"collection": "docs", "query": "What is HNSW?", **fields}
        request = SearchRequest(**body) if kind == "search" else RagRequest(**body)
        return ask(kind, request, models).key

    assert key() == key(query="what  is hnsw?")
    assert key() != key(query="what is ivfflat?")
    assert key() != key(top_k=3)
    assert key() != key(models="other")
    assert key() != key(kind="rag")
    assert key(kind="rag") == key(kind="rag", stream=True)  # streaming is delivery, not content
    asked = ask("search", SearchRequest(collection="docs", query=" What is HNSW? "), "m")
    assert asked.query == "what is hnsw?"
    assert asked.request["query"] == " What is HNSW? "  # asked again as it was asked
    assert "collection" not in asked.request


def control(**route) -> AdmissionControl:
    limits = {"max_running": 1, "max_queued": 0, "shed": True, **route}
    return AdmissionControl(overlay(Admission(), {"routes": {"rag": limits}}))


class Call:
    """A handle call that records its cancellation."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def test_background_takes_only_a_free_slot():
    admission = control(max_running=2, max_queued=4)
    first = admission.background("rag")
    assert first is not None
    client = await admission.enter("rag")
    assert admission.background("rag") is None  # both slots in use
    client.release()
    first.release()
    assert admission.gates["rag"].running == 0


async def test_client_preempts_background_work_instead_of_a_503():
    admission = control()  # one slot, no queue: a client is refused when it is taken
    background = admission.background("rag")
    call = background.track(Call())
    client = await admission.enter("rag")  # not refused
    assert background.preempted and call.cancelled
    assert admission.gates["rag"].running == 1
    background.release()  # the background request's own release is a no-op now
    assert admission.gates["rag"].running == 1
    with pytest.raises(APIError) as refused:
        await admission.enter("rag")  # a client-held slot is never given up
    assert refused.value.status == 503
    client.release()
    assert admission.gates["rag"].report()["preempted"] == 1


async def test_pressure_after_background_work_stops_it_rather_than_clients(monkeypatch):
    admission = control(max_running=4)
    background = admission.background("rag")
    monkeypatch.setattr(admission.pressure, "sample", lambda: True)
    assert admission.background("rag") is None  # no new background work under pressure
    client = await admission.enter("rag")  # the pressure may be background work's own
    assert background.preempted
    client.release()
    # Once background work is a shedding window in the past, pressure sheds clients again.
    admission.gates["rag"].background_ended -= admission.pressure.shedding.window_s + 1
    with pytest.raises(APIError) as shed:
        await admission.enter("rag")
    assert shed.value.body.code == "resource_pressure"


class Store:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.recorded: list = []
        self.rows: dict[tuple, Answer] = {}

    async def record(self, counts):
        if self.fail:
            raise StoreUnavailable("down")
        self.recorded += counts
        return []

    async def answer(self, collection_id, kind, key):
        return self.rows.get((collection_id, kind, key))


async def test_counts_are_batched_and_kept_through_an_outage():
    store = Store(fail=True)
    counter = QueryCounter(store, flush_interval_s=1)
    one = ask("search", SearchRequest(collection="docs", query="One"), "m")
    same = ask("search", SearchRequest(collection="docs", query="one "), "m")
    counter.count(one)
    counter.count(same)
    await counter.flush()
    assert counter.pending[one] == 2  # kept
    counter.count(one)
    store.fail = False
    await counter.flush()
    assert store.recorded == [(one, 3)] and not counter.pending


def answer(version: int, key: str = "k", collection_id: int = 1) -> Answer:
    return Answer(collection_id, "docs", "search", key, version, {}, datetime.now(UTC))


async def test_answers_follow_notifications():
    store = Store()
    answers = PrecomputedAnswers("postgresql://unused", store)
    answers.subscribed = True
    asked = ask("search", SearchRequest(collection="docs", query="q"), "m")
    # A new answer is notified: loaded from the store.
    store.rows[(1, "search", asked.key)] = answer(5, asked.key)
    await answers._apply("rag_precomputed", f"1:search:{asked.key}")
    assert answers.get(asked).version == 5
    # The collection changes: its answers of other versions go at once.
    await answers._apply("rag_collections", "1:6")
    assert answers.get(asked) is None
    # An answer that is no longer valid (or was deleted) is dropped when notified.
    store.rows[(1, "search", asked.key)] = answer(6, asked.key)
    await answers._apply("rag_precomputed", f"1:search:{asked.key}")
    assert answers.get(asked) is not None
    del store.rows[(1, "search", asked.key)]
    await answers._apply("rag_precomputed", f"1:search:{asked.key}")
    assert answers.get(asked) is None
    # Nothing is answered while not following the notifications.
    store.rows[(1, "search", asked.key)] = answer(6, asked.key)
    await answers._apply("rag_precomputed", f"1:search:{asked.key}")
    answers.subscribed = False
    assert answers.get(asked) is None


async def test_oversized_requests_are_not_counted():
    counter = QueryCounter(Store(), flush_interval_s=1)
    long_query = "q" * (MAX_COUNTED_BYTES + 1)
    counter.count(ask("search", SearchRequest(collection="docs", query=long_query), "m"))
    assert not counter.pending
    counter.count(ask("search", SearchRequest(collection="docs", query="short"), "m"))
    assert sum(counter.pending.values()) == 1


class RefusingVectorStore:
    """Refuses, as PostgreSQL would, every batch holding a query marked "refused"."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    @asynccontextmanager
    async def connection(self, transaction: bool = False):
        store = self

        class Cursor:
            async def executemany(self, sql, rows):
                if any("refused" in row[2] for row in rows):
                    raise InvalidData("The database refused a value: 22P05.")
                store.rows += rows

        class Conn:
            @asynccontextmanager
            async def cursor(self):
                yield Cursor()

        yield Conn()


async def test_a_refused_row_is_skipped_not_its_batch():
    vectors = RefusingVectorStore()
    counter = QueryCounter(PopularStore(vectors), flush_interval_s=1)
    for query in ("one", "refused", "two"):
        counter.count(ask("search", SearchRequest(collection="docs", query=query), "m"))
    await counter.flush()
    assert sorted(row[2] for row in vectors.rows) == ["one", "two"]
    assert (counter.written, counter.refused) == (2, 1)
    assert not counter.pending  # a refused row is not tried again


async def test_only_answered_or_admitted_requests_are_counted():
    config = PrecomputeConfig(count_queries=True, serve_precomputed=False, flush_interval_s=3600)
    popular = Popular(Store(), "postgresql://unused", config, "m")
    try:
        asked = popular.ask("search", SearchRequest(collection="docs", query="q"))
        assert popular.lookup(asked) is None
        assert not popular.counter.pending  # a miss is counted once admitted, not before
        popular.count(asked)
        assert popular.counter.pending[asked] == 1
    finally:
        for task in popular.tasks:
            task.cancel()


def body_answer(key: str, body: dict) -> Answer:
    return Answer(1, "docs", "search", key, 1, body, datetime.now(UTC))


def test_answers_in_memory_are_bounded_in_bytes():
    answers = PrecomputedAnswers(
        "postgresql://unused", Store(), answer_bytes=1000, memory_bytes=2500
    )
    answers.subscribed = True
    assert answers.hold(body_answer("a", {"text": "x" * 900}))
    assert not answers.hold(body_answer("big", {"text": "x" * 1001}))  # over one answer's bound
    assert answers.hold(body_answer("b", {"text": "x" * 900}))
    assert not answers.hold(body_answer("c", {"text": "x" * 900}))  # no room left
    assert not answers.hold(body_answer("d", {"n": 2**70}))  # not writable as JSON
    assert set(k[2] for k in answers.entries) == {"a", "b"}
    assert answers.held_bytes <= 2500 and answers.skipped == 3
    answers.forget("docs")
    assert answers.held_bytes == 0 and answers.hold(body_answer("c", {"text": "x" * 900}))
