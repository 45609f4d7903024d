"""deployments/streaming.py: deltas merged per interval, first and last at once."""

from __future__ import annotations

import asyncio

from deployments.streaming import merged
from serve_app.contracts import Delta


def _delta(k: int, finish: str | None = None) -> Delta:
    return Delta(text=f"t{k} ", finish_reason=finish, prompt_tokens=5, completion_tokens=k + 1)


async def _steps(n: int, gap_s: float):
    for k in range(n):
        await asyncio.sleep(gap_s)
        yield _delta(k, "stop" if k == n - 1 else None)


def _run(n: int, gap_s: float, interval_s: float) -> list[Delta]:
    async def main():
        return [d async for d in merged(_steps(n, gap_s), interval_s)]

    return asyncio.run(main())


def test_merging_keeps_every_token_and_the_ending():
    out = _run(40, 0.002, 0.03)
    assert "".join(d.text for d in out) == "".join(f"t{k} " for k in range(40))
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens == 40
    assert all(d.finish_reason is None for d in out[:-1])
    # the first goes out alone, at once; the rest in far fewer messages than steps
    assert out[0].text == "t0 " and out[0].completion_tokens == 1
    assert len(out) < 20


def test_zero_interval_passes_each_delta():
    out = _run(10, 0.0, 0.0)
    assert [d.completion_tokens for d in out] == list(range(1, 11))


def test_slow_steps_are_not_held():
    # steps slower than the interval: every delta goes out as it comes
    out = _run(5, 0.03, 0.01)
    assert len(out) == 5


def test_a_stream_without_an_ending_is_flushed():
    async def steps():
        for k in range(5):
            yield _delta(k)

    async def main():
        return [d async for d in merged(steps(), 10.0)]

    out = asyncio.run(main())
    assert "".join(d.text for d in out) == "t0 t1 t2 t3 t4 " and len(out) == 2
