"""Which sources a RAG prompt holds (serve_app/pipelines/rag.py), without a cluster."""

import asyncio
from dataclasses import dataclass

import pytest

from serve_app.config import RagConfig
from serve_app.contracts import Hit, Retrieved
from serve_app.pipelines.rag import (
    MAX_SOURCES,
    SOURCE_TOKENS,
    TEMPLATE_TOKENS,
    QuestionTooLong,
    Rag,
    Sources,
    prompt,
    sources_that_fit,
)
from serve_app.protocol.documents import RagRequest


def test_sources_are_dropped_from_the_weakest_never_the_system_prompt():
    base = 100
    budget = base + TEMPLATE_TOKENS + 3 * (50 + SOURCE_TOKENS)
    assert sources_that_fit(base, [50] * 10, budget) == 3
    assert sources_that_fit(base, [50] * 2, budget) == 2
    assert sources_that_fit(base, [5000, 10], budget) == 0  # a source that never fits stops it
    with pytest.raises(QuestionTooLong):
        sources_that_fit(budget, [], budget)  # the question alone fills the context


@dataclass
class Remote:
    value: object

    def remote(self, *args):
        async def result():
            return self.value(*args) if callable(self.value) else self.value

        return result()


class Generator:
    """Each text counts one token per character; a context of `context` tokens."""

    def __init__(self, context: int) -> None:
        self.model_info = Remote({"context_tokens": context})
        self.count_tokens = Remote(lambda texts: [len(t) for t in texts])


class Retriever:
    def __init__(self, hits: int) -> None:
        self.asked: list[RagRequest] = []
        self.hits = [Hit(i, f"d{i}", "x" * 100, {}, 1.0 - i / 1000) for i in range(hits)]

    async def retrieve(self, request: RagRequest) -> Retrieved:
        self.asked.append(request)
        return Retrieved(self.hits[: request.rerank_top_n], None, {})


def sources(rag: Rag, request: RagRequest) -> Sources:
    async def first() -> Sources:
        return await anext(rag.answer(request))

    return asyncio.run(first())


def make_rag(hits: int, context: int) -> Rag:
    rag = object.__new__(Rag.func_or_class)
    rag.retriever, rag.generator, rag.context_tokens = Retriever(hits), Generator(context), None
    rag.settings = RagConfig()
    return rag


def test_rerank_top_n_null_keeps_the_cap_on_sources():
    rag = make_rag(hits=100, context=100_000)
    request = RagRequest(collection="c", query="q", top_k=100, rerank_top_n=None, max_tokens=8)
    assert len(sources(rag, request).citations) == MAX_SOURCES
    assert rag.retriever.asked[0].rerank_top_n == MAX_SOURCES


def test_sources_are_trimmed_to_the_context():
    rag = make_rag(hits=20, context=1000)
    request = RagRequest(collection="c", query="q", top_k=20, rerank_top_n=20, max_tokens=200)
    cited = sources(rag, request).citations
    # 1000 - 200 for the answer, less the system prompt, question and template; 108 a source.
    base = len("\n".join(m["content"] for m in prompt(RagConfig().system_prompt, "q", [])))
    fit = (1000 - 200 - base - TEMPLATE_TOKENS) // (100 + SOURCE_TOKENS)
    assert 0 < fit < 20
    assert [c.number for c in cited] == list(range(1, fit + 1))
    assert [c.document_id for c in cited] == [f"d{i}" for i in range(fit)]  # the best kept


def test_the_answer_is_asked_for_without_repeating_itself():
    """The generation request carries the configured prompt and the no-repeat n-gram size."""
    rag = make_rag(hits=3, context=100_000)
    asked = []

    async def generate(generation):
        asked.append(generation)
        return
        yield

    class Stream:
        def options(self, **_):
            return self

        class generate:  # mirrors a handle's method
            @staticmethod
            def remote(generation):
                return generate(generation)

    stream = Stream()
    stream.model_info, stream.count_tokens = rag.generator.model_info, rag.generator.count_tokens
    rag.generator = stream
    rag.settings = RagConfig(system_prompt="Be brief.", no_repeat_ngram=4)
    request = RagRequest(collection="c", query="why?", top_k=3, rerank_top_n=3, max_tokens=8)

    async def drain():
        return [event async for event in rag.answer(request)]

    asyncio.run(drain())
    (generation,) = asked
    assert generation.no_repeat_ngram == 4
    assert generation.messages[0] == {"role": "system", "content": "Be brief."}
    assert "[3] " in generation.messages[1]["content"]
