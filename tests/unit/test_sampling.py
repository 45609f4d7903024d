"""Sampling: every value the API accepts gives a token, and nothing unsafe reaches multinomial."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deployments.engines.sampling import (
    GREEDY_BELOW,
    LOGIT_BOUND,
    NUCLEUS_FIRST_K,
    new_rng,
    nucleus,
    repeating,
    sample_row,
)
from serve_app.contracts import GenerationRequest
from serve_app.protocol.openai import ChatCompletionRequest

VOCAB = 64
# The bounds ChatCompletionRequest accepts, taken from the model so they cannot drift apart.
FIELDS = ChatCompletionRequest.model_fields


def bound(name: str, kind: str) -> float:
    return next(getattr(m, kind) for m in FIELDS[name].metadata if hasattr(m, kind))


temperatures = st.one_of(
    st.floats(0.0, bound("temperature", "le")),
    st.sampled_from([5e-324, 1e-45, 1e-38, GREEDY_BELOW / 2, GREEDY_BELOW]),
)
top_ps = st.one_of(
    st.floats(0.0, bound("top_p", "le"), exclude_min=True),
    st.sampled_from([5e-324, 1e-300, 1.0]),
)
penalties = st.floats(bound("presence_penalty", "ge"), bound("presence_penalty", "le"))
seeds = st.one_of(st.none(), st.integers(bound("seed", "ge"), bound("seed", "le")))
# What a model may put out: ordinary logits, and the overflowed values of a low precision.
logit_values = st.one_of(
    st.floats(-30, 30),
    st.sampled_from([math.inf, -math.inf, math.nan, 3.4e38, -3.4e38, 65504.0]),
)


def accepted(**fields) -> ChatCompletionRequest:
    """The value really passes the API's validation (a test of the strategies themselves)."""
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def sample(logits: torch.Tensor, request: GenerationRequest, said: list[int]) -> int:
    """One token, with a fresh random generator of the request's seed."""
    return sample_row(logits, request, list(said), new_rng(request, "cpu"))


@pytest.fixture
def checked_multinomial(monkeypatch):
    """torch.multinomial, asserting it only ever sees finite, non-negative, non-zero rows."""
    original = torch.multinomial

    def safe(probs, *args, **kwargs):
        assert torch.isfinite(probs).all() and (probs >= 0).all() and probs.sum() > 0
        return original(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", safe)


# The fixture only wraps multinomial: nothing in it needs resetting between examples.
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    temperature=temperatures,
    top_p=top_ps,
    frequency=penalties,
    presence=penalties,
    seed=seeds,
    logits=st.lists(logit_values, min_size=VOCAB, max_size=VOCAB),
    said=st.lists(st.integers(0, VOCAB - 1), max_size=40),
)
def test_every_accepted_setting_samples_a_token(
    checked_multinomial, temperature, top_p, frequency, presence, seed, logits, said
):
    fields = dict(temperature=temperature, top_p=top_p, seed=seed)
    accepted(**fields, frequency_penalty=frequency, presence_penalty=presence)
    request = GenerationRequest(
        messages=[], max_tokens=8, frequency_penalty=frequency, presence_penalty=presence, **fields
    )
    row = torch.tensor(logits, dtype=torch.float32)
    token = sample(row, request, said)
    assert 0 <= token < VOCAB
    penalized = said and (frequency or presence)
    if (temperature < GREEDY_BELOW or top_p < 1e-30) and not penalized:
        # Greedy, or the nucleus is the top token alone: a token of the largest logit, with
        # overflowed values counted at the clamp (so inf and 3.4e38 tie).
        bounded = row.nan_to_num(nan=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)
        assert bounded[token] == bounded.max()


@settings(max_examples=100, deadline=None)
@given(temperature=st.sampled_from([5e-324, 1e-45, 1e-10, GREEDY_BELOW / 2]), seed=seeds)
def test_a_temperature_too_small_to_compute_is_greedy(temperature, seed):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) * 10
    request = GenerationRequest(messages=[], max_tokens=8, temperature=temperature, seed=seed)
    assert sample(logits, request, []) == int(logits.argmax())


def test_a_seed_repeats_its_samples_and_different_seeds_differ():
    logits = torch.zeros(VOCAB)  # uniform: every token equally likely
    request = GenerationRequest(messages=[], max_tokens=8, temperature=1.0, seed=-(2**63))

    def draws(req: GenerationRequest) -> list[int]:
        rng = new_rng(req, "cpu")  # one generator for the whole answer, as an engine keeps it
        return [sample_row(logits, req, [], rng) for _ in range(20)]

    assert draws(request) == draws(request)
    other = GenerationRequest(messages=[], max_tokens=8, temperature=1.0, seed=2**64 - 1)
    assert draws(request) != draws(other)


@settings(max_examples=200, deadline=None)
@given(
    spread=st.floats(0.01, 20.0),
    top_p=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([1e-300, 0.999999])),
    seed=st.integers(0, 2**32 - 1),
)
# The largest float under 1 is 1.0 in float32: the top-k search once stopped early on it.
@example(spread=7.0, top_p=0.9999999999999999, seed=0)
def test_the_nucleus_is_the_set_a_sort_of_the_whole_row_keeps(spread, top_p, seed):
    """Peaked and flat rows of a vocabulary many times `NUCLEUS_FIRST_K`, so the top-k search
    stops early on some rows and doubles up to the whole row on others."""
    vocab = NUCLEUS_FIRST_K * 40
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * spread
    probs = torch.softmax(logits, dim=-1)
    ordered, order = probs.sort(descending=True)
    expected = order[ordered.cumsum(-1) - ordered <= top_p]
    kept, ids = nucleus(probs, top_p)
    assert set(ids.tolist()) == set(expected.tolist())
    assert torch.equal(kept, probs[ids]) and len(ids) >= 1


def test_penalties_steer_away_from_what_was_said():
    logits = torch.zeros(VOCAB)
    logits[3] = 1.0
    request = GenerationRequest(messages=[], max_tokens=8, frequency_penalty=2.0)
    assert sample(logits, request, [3]) != 3
    assert sample(logits, request, []) == 3


@given(
    said=st.lists(st.integers(0, 5), max_size=60),
    n=st.integers(1, 5),
    logits=st.lists(st.floats(-30, 30), min_size=VOCAB, max_size=VOCAB),
    temperature=st.sampled_from([0.0, 0.7]),
)
def test_an_answer_never_repeats_its_own_ngrams(said, n, logits, temperature):
    """Whatever the logits say, the next token never closes an n-gram the answer already
    holds (a token outside the answer's six ids is always there to take)."""
    request = GenerationRequest(
        messages=[], max_tokens=8, temperature=temperature, seed=1, no_repeat_ngram=n
    )
    token = sample(torch.tensor(logits), request, said)
    grams = {tuple(said[i : i + n]) for i in range(len(said) - n + 1)}
    if len(said) >= n - 1:
        assert (*said[len(said) - n + 1 :], token) not in grams


def test_a_greedy_loop_is_broken_and_the_prompt_may_be_copied():
    logits = torch.zeros(VOCAB)
    logits[7] = 5.0  # greedy would say 7 again
    looping = GenerationRequest(messages=[], max_tokens=8, no_repeat_ngram=3)
    assert sample(logits, looping, [1, 2, 7, 1, 2]) != 7
    assert sample(logits, looping, [1, 2, 7, 1, 3]) == 7  # no repeat: allowed
    assert logits[7] == 5.0  # the bans work on a copy, never on the batch's logits
    off = GenerationRequest(messages=[], max_tokens=8)
    assert sample(logits, off, [1, 2, 7, 1, 2]) == 7
    assert repeating([1, 2, 7, 1, 2], 3) == {7}
    assert repeating([4, 4], 1) == {4}
    assert repeating([1, 2], 0) == set()
