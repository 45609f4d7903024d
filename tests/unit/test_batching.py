"""Batches bounded in items and tokens, and forward passes sized by free GPU memory."""

import asyncio

import pytest

from deployments.batching import isolate
from deployments.engines.batching import ForwardBudget, Piece, batch_cost, split, unwrap


def test_pieces_respect_both_bounds():
    tokens = [10, 10, 200, 5, 5, 5, 300, 1]
    pieces = split(list(range(len(tokens))), tokens, max_items=4, max_tokens=256)
    assert [list(p.items) for p in pieces] == [[0, 1, 2, 3], [4, 5], [6], [7]]
    for p in pieces:
        assert len(p) <= 4 and 1 <= p.cost <= 4
        assert sum(p.tokens) <= 256 or len(p) == 1  # a single over-long item stands alone
    # Short items cost their count; a piece of long ones costs its share of the token bound.
    assert pieces[1].cost == 2 and pieces[3].cost == 1
    assert pieces[0].cost == 4 and pieces[2].cost == 4  # 225 of 256 tokens; 300 alone


@pytest.mark.parametrize("n", [1, 7, 64, 65, 300])
def test_any_batch_of_whole_pieces_within_max_size_stays_within_both_bounds(n):
    tokens = [(i * 37) % 120 + 1 for i in range(n)]
    pieces = split(list(range(n)), tokens, max_items=64, max_tokens=2048)
    assert sum(len(p) for p in pieces) == n
    batch, total = [], 0
    for p in pieces:
        if total + p.cost > 64:
            break
        batch.append(p)
        total += p.cost
    assert batch_cost(batch) <= 64
    assert sum(len(p) for p in batch) <= 64
    assert sum(sum(p.tokens) for p in batch) <= 2048


def test_an_empty_request_is_one_empty_piece():
    (piece,) = split([], [], max_items=8, max_tokens=100)
    assert len(piece) == 0 and piece.cost == 1


def test_forward_budget_follows_free_gpu_memory():
    budget = ForwardBudget(per_forward=256, device="cuda", bytes_per_token=1000.0)
    budget.free_memory = lambda: 100_000_000
    assert budget.items(longest_tokens=100) == 256  # 0.5 * 1e8 / (1000 * 100) = 500 fits
    budget.free_memory = lambda: 10_000_000
    assert budget.items(longest_tokens=100) == 50
    budget.free_memory = lambda: 0
    assert budget.items(longest_tokens=100) == 1
    assert ForwardBudget(per_forward=16).items(longest_tokens=10_000) == 16  # CPU: fixed


def test_a_failing_piece_fails_alone_and_the_rest_of_its_batch_succeeds():
    pieces = [Piece([text], [1], 1) for text in ["a", "poison", "b"]]
    calls = []

    async def run(batch):
        calls.append(len(batch))
        if any("poison" in p.items for p in batch):
            raise ValueError("bad input")
        return [p.items[0].upper() for p in batch]

    results = asyncio.run(isolate(pieces, run))
    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], ValueError)
    assert calls == [3, 1, 1, 1]  # the batch once, then each piece alone
    assert unwrap(results[:1]) == ["A"]
    with pytest.raises(ValueError):
        unwrap(results)
    # A batch that succeeds runs once; a single piece that fails raises as it is.
    assert asyncio.run(isolate(pieces[:1], run)) == ["A"]
    with pytest.raises(ValueError):
        asyncio.run(isolate(pieces[1:2], run))
