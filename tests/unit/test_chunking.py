"""Token windows of chunking (serve_app/chunking.py): coverage and count bounds."""

import math

from hypothesis import given
from hypothesis import strategies as st

from serve_app.chunking import Windows

MODEL_TOKENS = 254  # all-MiniLM-L6-v2 reads 256 tokens, less [CLS] and [SEP]


@st.composite
def requests(draw) -> tuple[int, int, int, int]:
    max_tokens = draw(st.integers(16, 8192))
    overlap = draw(st.integers(0, max_tokens - 1))  # what the Chunking model accepts
    model_tokens = draw(st.integers(1, 4096))
    n = draw(st.integers(0, 20_000))
    return max_tokens, overlap, model_tokens, n


@given(requests())
def test_every_token_is_in_a_window_and_the_count_is_bounded(args):
    max_tokens, overlap, model_tokens, n = args
    windows = Windows.fit(max_tokens, overlap, model_tokens)
    spans = windows.spans(n)
    assert 1 <= windows.size <= min(max_tokens, model_tokens)
    assert 0 <= windows.overlap < windows.size
    assert windows.stride >= math.ceil(windows.size / 4)
    assert all(0 <= i < j <= n and j - i <= windows.size for i, j in spans)
    covered = [False] * n
    for i, j in spans:
        covered[i:j] = [True] * (j - i)
    assert all(covered)
    if n:
        assert spans[-1][1] == n
    bound = math.ceil(max(0, n - windows.overlap) / windows.stride) + 1 if n else 0
    assert len(spans) <= bound == windows.max_count(n)


def test_an_overlap_for_a_larger_window_shrinks_with_it():
    # 1024/256 on a 254-token model used to leave a stride of 1: 946 chunks of 600 words.
    windows = Windows.fit(1024, 256, MODEL_TOKENS)
    assert (windows.size, windows.overlap) == (254, 63)
    assert len(windows.spans(700)) == 4


def test_the_last_tokens_are_in_the_last_window():
    windows = Windows.fit(200, 32, MODEL_TOKENS)
    spans = windows.spans(600)
    assert spans == [(0, 200), (168, 368), (336, 536), (400, 600)]


def test_an_overlap_near_the_window_keeps_a_minimum_stride():
    windows = Windows.fit(200, 199, MODEL_TOKENS)
    assert windows.stride == 50
    assert len(windows.spans(1000)) <= 20


def test_short_and_empty_texts():
    windows = Windows.fit(200, 32, MODEL_TOKENS)
    assert windows.spans(0) == []
    assert windows.spans(1) == [(0, 1)]
    assert windows.spans(200) == [(0, 200)]
