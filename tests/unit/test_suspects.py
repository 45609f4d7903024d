"""A request that kills replicas is not sent to one after another; outside kills stay hidden."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from serve_app.config import RouteLimits
from serve_app.http.admission import Gate, Ticket
from serve_app.http.suspects import Suspects, digest
from serve_app.protocol.errors import APIError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001  # every reading is later than the one before
        return self.now


class Replicas:
    """Stands in for a deployment handle: counts calls; a poison input kills its replica."""

    def __init__(self, outside_kills: int = 0) -> None:
        self.calls = 0
        self.deaths = 0
        self.outside_kills = outside_kills  # the next calls die for reasons of their own

    def make(self, text: str):
        async def call() -> str:
            self.calls += 1
            await asyncio.sleep(0)  # in flight: concurrent calls all start before any ends
            if text == "poison" or self.outside_kills > 0:
                self.outside_kills -= 1
                self.deaths += 1
                raise RayActorError()
            return text.upper()

        return call()


@pytest.fixture
def suspects() -> Suspects:
    return Suspects(ttl_s=60, clock=Clock())


async def call(suspects: Suspects, replicas: Replicas, text: str) -> str:
    gate = Gate(
        "embeddings", RouteLimits(max_running=8, max_queued=8, deadline_s=10), suspects=suspects
    )
    t = Ticket(gate, deadline=asyncio.get_running_loop().time() + 10)
    return await t.call(lambda: replicas.make(text), {"input": text})


def test_an_outside_kill_is_retried_and_leaves_nothing_behind(suspects):
    replicas = Replicas(outside_kills=1)
    assert asyncio.run(call(suspects, replicas, "fine")) == "FINE"
    assert replicas.calls == 2 and len(suspects) == 0


def test_a_request_that_kills_replicas_stops_after_two_and_is_refused_after(suspects):
    replicas = Replicas()
    with pytest.raises(APIError) as refused:
        asyncio.run(call(suspects, replicas, "poison"))
    assert refused.value.status == 422 and refused.value.body.code == "request_crashed_replica"
    assert replicas.deaths == 2
    # The client sends it again: refused before any replica sees it.
    with pytest.raises(APIError):
        asyncio.run(call(suspects, replicas, "poison"))
    assert replicas.deaths == 2
    # Others are served meanwhile, and retried as before if an outside kill hits them.
    replicas.outside_kills = 1
    assert asyncio.run(call(suspects, replicas, "fine")) == "FINE"


def test_identical_requests_on_one_dying_replica_count_as_one_death(suspects):
    replicas = Replicas(outside_kills=3)  # three identical requests die together

    async def together() -> list[str]:
        return await asyncio.gather(*(call(suspects, replicas, "popular") for _ in range(3)))

    assert asyncio.run(together()) == ["POPULAR"] * 3  # each retried once, and answered
    assert len(suspects) == 0


def test_a_request_implicated_once_is_not_retried_on_its_next_death(suspects):
    replicas = Replicas(outside_kills=1)
    key = digest("embeddings", {"input": "twice"})
    started = suspects.clock()
    assert not suspects.died(key, started)  # an earlier request's death, its retry lost
    with pytest.raises(APIError):
        asyncio.run(call(suspects, replicas, "twice"))
    assert replicas.calls == 1


def test_implications_expire_and_the_set_is_bounded():
    clock = Clock()
    suspects = Suspects(max_size=3, ttl_s=5, clock=clock)
    for n in range(10):
        suspects.died(f"k{n}", clock())
    assert len(suspects) == 3
    suspects.died("k9", clock())
    assert suspects.condemned("k9")
    clock.now += 6
    assert not suspects.condemned("k9") and len(suspects) == 0
