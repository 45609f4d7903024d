"""The RAG route's deployment: retrieve, rerank, and answer with numbered citations (kept to
the given sources by `citations.CitationFilter`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.contracts import Delta, Generated, GenerationRequest, Sources
from serve_app.errors import QuestionTooLong
from serve_app.metrics import generated_tokens, record_stages
from serve_app.pipelines.citations import CitationFilter
from serve_app.pipelines.retrieval import Retriever
from serve_app.protocol.documents import Citation, RagRequest
from serve_app.store import open_store

# Sources the model reads at most, whatever `rerank_top_n` (None included) asks.
MAX_SOURCES = 20
# Tokens of the chat template around the messages, and of each source's "[n] " and the blank
# line after it, plus what joining texts can add at their boundaries: upper bounds.
TEMPLATE_TOKENS = 32
SOURCE_TOKENS = 8


def sources_that_fit(base_tokens: int, source_tokens: list[int], budget: int) -> int:
    """How many sources, best first, fit in `budget` prompt tokens beside the system prompt
    and the question (`base_tokens`). The generator keeps the end of a prompt that does not
    fit, which would cut the system prompt; sources are dropped instead, the weakest first."""
    used = base_tokens + TEMPLATE_TOKENS
    if used > budget:
        raise QuestionTooLong(
            "query: the question leaves no room in the generator's context for max_tokens; "
            "shorten it or ask for fewer max_tokens."
        )
    for kept, tokens in enumerate(source_tokens):
        used += tokens + SOURCE_TOKENS
        if used > budget:
            return kept
    return len(source_tokens)


def prompt(system: str, query: str, citations: list[Citation]) -> list[dict[str, str]]:
    """The question first, then the numbered sources, then the question again: a small model
    answers what it read last, and it then stays on the question rather than the sources."""
    sources = "\n\n".join(f"[{c.number}] {c.text}" for c in citations)
    ask = f'Answer the question "{query}" from the sources, citing them like [1].'
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Question: {query}\n\nSources:\n{sources}\n\n{ask}"},
    ]


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.05})
class Rag:
    async def __init__(
        self,
        embedder: DeploymentHandle,
        reranker: DeploymentHandle,
        generator: DeploymentHandle,
        config: AppConfig,
    ) -> None:
        self.store = await open_store(config.store, "Rag")
        self.retriever = Retriever(embedder, reranker, self.store, config)
        self.generator = generator
        self.settings = config.rag
        self.context_tokens: int | None = None  # the generator's, asked once

    async def answer(self, request: RagRequest) -> AsyncIterator[Sources | Delta | Generated]:
        """Sources first, then the answer's deltas as the generator streams them, then timing.
        At most MAX_SOURCES sources, and only as many as fit the generator's context."""
        keep = min(request.rerank_top_n or MAX_SOURCES, MAX_SOURCES)
        retrieved = await self.retriever.retrieve(request.model_copy(update={"rerank_top_n": keep}))
        hits = retrieved.hits[:keep]
        scores = retrieved.rerank_scores or [h.score for h in hits]
        start = time.perf_counter()
        hits = hits[: await self._fitting(request, [h.text for h in hits])]
        timings = {**retrieved.timings, "fit_ms": (time.perf_counter() - start) * 1000}
        citations = [
            Citation(number=n, document_id=h.document_id, chunk_id=h.chunk_id, score=s, text=h.text)
            for n, (h, s) in enumerate(zip(hits, scores, strict=False), start=1)
        ]
        record_stages("rag", timings)
        yield Sources(citations, timings)
        start = time.perf_counter()
        generation = GenerationRequest(
            messages=prompt(self.settings.system_prompt, request.query, citations),
            max_tokens=request.max_tokens,
            no_repeat_ngram=self.settings.no_repeat_ngram,
        )
        tokens, first_token_ms = 0, None
        cited = CitationFilter(citations, self.settings.grounding_citation)
        async for delta in self.generator.options(stream=True).generate.remote(generation):
            tokens = delta.completion_tokens
            text = cited.feed(delta.text)
            if delta.finish_reason is not None:
                text += cited.close()
            if text and first_token_ms is None:
                first_token_ms = (time.perf_counter() - start) * 1000
            yield replace(delta, text=text)
        generated = Generated((time.perf_counter() - start) * 1000, first_token_ms)
        record_stages("rag", generated.timings())
        if tokens:
            generated_tokens().inc(tokens, tags={"route": "rag"})
        yield generated

    async def _fitting(self, request: RagRequest, texts: list[str]) -> int:
        """How many of `texts` (best first) fit the generator's context with the question."""
        if self.context_tokens is None:
            info = await self.generator.model_info.remote()
            self.context_tokens = int(info["context_tokens"])
        system = self.settings.system_prompt
        base = "\n".join(m["content"] for m in prompt(system, request.query, []))
        counts = await self.generator.count_tokens.remote([base, *texts])
        budget = self.context_tokens - (request.max_tokens or 0)  # the ingress fills it
        return sources_that_fit(counts[0], counts[1:], budget)
