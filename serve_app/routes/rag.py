"""The RAG route's deployment: retrieve, rerank, and answer with numbered citations."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.protocol.documents import Citation, RagRequest
from serve_app.protocol.generation import Delta, GenerationRequest
from serve_app.routes.retrieval import Retriever
from serve_app.store import open_store

SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources. Cite the sources you use by their "
    "number in square brackets, like [1]. If the sources do not answer the question, say so."
)


@dataclass(frozen=True)
class Sources:
    """The first event of an answer: what it may cite, and how long retrieval took."""

    citations: list[Citation]
    timings: dict[str, float]


@dataclass(frozen=True)
class Generated:
    """The last event of an answer."""

    generate_ms: float


def prompt(query: str, citations: list[Citation]) -> list[dict[str, str]]:
    sources = "\n\n".join(f"[{c.number}] {c.text}" for c in citations)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {query}"},
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

    async def answer(self, request: RagRequest) -> AsyncIterator[Sources | Delta | Generated]:
        """Sources first, then the answer's deltas as the generator streams them, then timing."""
        retrieved = await self.retriever.retrieve(request)
        scores = retrieved.rerank_scores or [h.score for h in retrieved.hits]
        citations = [
            Citation(number=n, document_id=h.document_id, chunk_id=h.chunk_id, score=s, text=h.text)
            for n, (h, s) in enumerate(zip(retrieved.hits, scores, strict=True), start=1)
        ]
        yield Sources(citations, retrieved.timings)
        start = time.perf_counter()
        generation = GenerationRequest(
            messages=prompt(request.query, citations), max_tokens=request.max_tokens
        )
        async for delta in self.generator.options(stream=True).generate.remote(generation):
            yield delta
        yield Generated((time.perf_counter() - start) * 1000)
