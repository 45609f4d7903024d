"""Coalesced embedding calls (serve_app/http/coalesce.py), against an embedder in this process
that answers like the Embedder deployment's `embed`: one row per text, the row its text's
number, after a few milliseconds of "model time"."""

import asyncio

import numpy as np
import pytest
from ray.exceptions import RayActorError

from serve_app.config import Coalescing
from serve_app.contracts import Embeddings
from serve_app.http.coalesce import EmbeddingCalls
from tests.conftest import replica_loop


@pytest.fixture(scope="module")
def run():
    with replica_loop(1024) as run:
        yield run


class Embedder:
    """Texts are numbers; `poison` fails the call that carries it; `dead` fails every call as
    a dead replica would."""

    def __init__(self, poison: str | None = None, dead: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.poison, self.dead = poison, dead
        self.embed = self  # handle.embed.remote(...)

    def remote(self, texts: list[str]):
        self.calls.append(list(texts))
        return self._answer(texts)

    async def _answer(self, texts: list[str]) -> Embeddings:
        await asyncio.sleep(0.01)
        if self.dead:
            raise RayActorError()
        if self.poison in texts:
            raise ValueError("cannot embed this text")
        vectors = np.array([[float(t), 1.0] for t in texts], dtype=np.float32)
        return Embeddings(vectors, [len(t) for t in texts], [t == "99" for t in texts], "m", "fp32")


async def raised(awaitable):
    """What `awaitable` returns; what it raises, wrapped in a tuple to tell the two apart."""
    try:
        return await awaitable
    except (Exception, asyncio.CancelledError) as exc:
        return ("raised", exc)


async def burst(calls: EmbeddingCalls, requests: list[list[str]]) -> list:
    return await asyncio.gather(*(raised(calls.embed(r)) for r in requests))


def test_concurrent_requests_share_calls_and_each_gets_its_own_rows(run):
    embedder = Embedder()
    requests = [[str(i)] for i in range(20)] + [["20", "21", "99"]]

    async def scenario():
        return await burst(EmbeddingCalls(embedder, Coalescing(max_inputs=64)), requests)

    results = run(scenario())
    assert len(embedder.calls) < len(requests) / 2, embedder.calls
    assert sorted(t for call in embedder.calls for t in call) == sorted(
        t for r in requests for t in r
    )
    for texts, result in zip(requests, results, strict=True):
        assert [row[0] for row in result.vectors] == [float(t) for t in texts]
        assert result.tokens == [len(t) for t in texts]
    assert results[-1].truncated == 1 and sum(r.truncated for r in results[:-1]) == 0


def test_a_failing_request_fails_alone(run):
    embedder = Embedder(poison="7")

    async def scenario():
        return await burst(EmbeddingCalls(embedder, Coalescing()), [[str(i)] for i in range(12)])

    results = run(scenario())
    failed = [i for i, r in enumerate(results) if isinstance(r, tuple)]
    assert failed == [7], results
    assert isinstance(results[7][1], ValueError)
    assert all(r.vectors[0, 0] == i for i, r in enumerate(results) if i != 7)


def test_a_dead_replica_fails_each_request_as_its_own_call_would(run):
    async def scenario():
        embedder = Embedder(dead=True)
        results = await burst(EmbeddingCalls(embedder, Coalescing()), [["1"], ["2"], ["3"]])
        return embedder, results

    embedder, results = run(scenario())
    assert all(r[0] == "raised" and isinstance(r[1], RayActorError) for r in results), results
    assert len(embedder.calls) < 3  # not called again here: each caller's ticket does that


@pytest.mark.parametrize(
    ("settings", "texts"),
    [(Coalescing(enabled=False), ["1"]), (Coalescing(max_inputs=4), ["1", "2", "3", "4"])],
)
def test_disabled_or_large_requests_go_alone(run, settings, texts):
    async def scenario():
        embedder = Embedder()
        calls = EmbeddingCalls(embedder, settings)
        answers = await burst(calls, [texts, texts])
        return embedder, answers

    embedder, answers = run(scenario())
    assert embedder.calls == [texts, texts]
    assert all(a.vectors.shape == (len(texts), 2) for a in answers)


def test_a_cancelled_request_leaves_the_others_their_answers(run):
    async def scenario():
        calls = EmbeddingCalls(Embedder(), Coalescing())
        tasks = [calls.embed([str(i)]) for i in range(6)]
        tasks[2].cancel()
        return await asyncio.gather(*(raised(t) for t in tasks))

    results = run(scenario())
    assert isinstance(results[2][1], asyncio.CancelledError)
    assert [r.vectors[0, 0] for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]
