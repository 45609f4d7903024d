"""The generator's decode metrics (serve_app.metrics.DecodeSteps): tokens per decode step and
time per output token, by hand and through the Generator's decode loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from deployments.engines.base import Sequence
from deployments.generator import _Admission
from serve_app import metrics
from serve_app.contracts import Delta, GenerationRequest
from tests.unit.test_decode import generator, request, tiny  # noqa: F401 (a fixture)


class Recorded:
    """A histogram or counter that keeps what it records."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values.append(value)

    inc = observe


@pytest.fixture
def recorded(monkeypatch) -> Iterator[tuple[Recorded, Recorded]]:
    """(tokens per step, time per output token) as the decode metrics record them; the
    decoded-tokens counter must count what the histogram of tokens per step holds."""
    step_tokens, tpot, decoded = Recorded(), Recorded(), Recorded()
    monkeypatch.setattr(metrics, "generator_step_tokens", lambda: step_tokens)
    monkeypatch.setattr(metrics, "generator_tpot_ms", lambda: tpot)
    monkeypatch.setattr(metrics, "generator_decoded_tokens", lambda: decoded)
    yield step_tokens, tpot
    assert decoded.values == step_tokens.values


def sequence() -> Sequence:
    return Sequence(GenerationRequest([{"role": "user", "content": "hi"}], 8), prompt=[1, 2])


def emit(s: Sequence, tokens: int, finish: str | None = None) -> Sequence:
    s.delta = Delta("x", finish, len(s.prompt), tokens)
    return s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tokens_per_step_and_time_per_output_token_after_the_first(recorded):
    step_tokens, tpot = recorded
    clock = Clock()
    steps = metrics.DecodeSteps(clock)
    long, cancelled, failed, short = sequence(), sequence(), sequence(), sequence()

    clock.now = 1.0  # every sequence's first token; `short` ends on it
    steps.stepped([emit(long, 1), emit(cancelled, 1), emit(failed, 1), emit(short, 1, "stop")])
    clock.now = 1.5  # `cancelled` was abandoned: no token; `failed` raised: no token
    cancelled.delta = Delta("", "cancelled", 2, 1)
    failed.error = ValueError("poisoned")
    steps.stepped([emit(long, 2), cancelled, failed])
    clock.now = 4.0
    steps.stepped([emit(long, 3, "length")])

    assert step_tokens.values == [4, 1, 1]
    # Only `long` had tokens after its first: 2 of them, from 1.0 s to 4.0 s.
    assert tpot.values == [pytest.approx(1500.0)]
    assert steps.first == {}  # nothing held once every sequence has ended


def test_sequences_lost_to_a_failed_step_are_forgotten(recorded):
    step_tokens, tpot = recorded
    clock = Clock()
    steps = metrics.DecodeSteps(clock)
    lost, kept = sequence(), sequence()
    steps.stepped([emit(lost, 1), emit(kept, 1)])
    clock.now = 2.0  # `lost` left with a failed step (never reported done); `kept` goes on
    steps.stepped([emit(kept, 2)])
    assert set(steps.first) == {id(kept)}
    clock.now = 3.0
    steps.stepped([emit(kept, 3, "stop")])
    assert step_tokens.values == [2, 1, 1]
    assert tpot.values == [pytest.approx(1500.0)]


def last_delta(admission: _Admission) -> Delta:
    """The last delta the loop handed `admission`'s one sequence."""
    deltas = []
    while (out := admission.outputs.get_nowait()) is not None:
        deltas += [d for d in out if isinstance(d, Delta)]
    return deltas[-1]


def test_the_decode_loop_records_every_token_it_generates(tiny, recorded):  # noqa: F811
    step_tokens, tpot = recorded
    g = generator(tiny)
    requests = [request("hello there", max_tokens=6), request("another client", max_tokens=10)]
    admissions = [_Admission([g.engine.sequence(r)]) for r in requests]
    g.waiting.extend(admissions)  # two batches, as @serve.batch hands them
    asyncio.run(g._decode_loop())
    completions = [last_delta(a).completion_tokens for a in admissions]
    generated = sum(completions)
    assert generated > 2
    assert sum(step_tokens.values) == generated
    assert max(step_tokens.values) == 2  # the two answers shared decode steps
    # One observation per answer with tokens after its first, each a positive time.
    assert len(tpot.values) == sum(c > 1 for c in completions)
    assert all(v > 0 for v in tpot.values)
