"""The transformers engine's incremental detokenization: the text it builds a token at a time
is the text of the whole answer decoded at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.engines import loading
from deployments.engines.hf import TransformersEngine, _Decoding
from serve_app.config import AppConfig


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    config = AppConfig()
    engine = TransformersEngine.__new__(TransformersEngine)
    engine.tokenizer = loading.load_tokenizer(config.generator, config.model_cache_dir)
    return engine


def _incremental(engine: TransformersEngine, ids: list[int]) -> str:
    decoding, text = _Decoding(None), ""
    for n in range(1, len(ids) + 1):
        text = decoding.text(engine, ids[:n])
    return text


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! Batching is configured in serve_config.yaml.",
        "  leading spaces and\nnew lines\n\n  indented",
        "한국어 문장도 한 토큰씩 나옵니다. 법률 제12조",
        "emoji 🙂👍🏽 and accents: café, naïve, Ærøskøbing",
        "[1] [2] [3] citations, then code: `x = f(y) ** 2`",
    ],
)
def test_incremental_text_is_the_whole_decode(engine, text):
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _incremental(engine, ids) == engine._decode(ids)


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_any_text_decodes_the_same_a_token_at_a_time(engine, text):
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = engine._decode(ids)
    got = _incremental(engine, ids)
    # Only an incomplete character at the very end is held back.
    assert got == whole or (whole.endswith("\ufffd") and whole.startswith(got))
