"""Retrieval shared by the search and RAG routes: embed the query, search, optionally rerank."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.protocol.documents import RetrievalRequest
from serve_app.store.vector_store import Hit, ModelMismatch, VectorStore


@dataclass(frozen=True)
class Retrieved:
    hits: list[Hit]
    rerank_scores: list[float] | None
    timings: dict[str, float]


class Retriever:
    def __init__(
        self,
        embedder: DeploymentHandle,
        reranker: DeploymentHandle,
        store: VectorStore,
        config: AppConfig,
    ) -> None:
        self.embedder = embedder
        self.reranker = reranker
        self.store = store
        self.model = config.embedder.model
        self.ef_search = config.store.ef_search

    async def retrieve(self, request: RetrievalRequest) -> Retrieved:
        """The `top_k` nearest chunks; reranked and cut to `rerank_top_n` when asked."""
        timings: dict[str, float] = {}
        collection = await self.store.collection(request.collection)
        if collection.embedding_model != self.model:
            raise ModelMismatch(
                f"The collection '{request.collection}' was embedded with "
                f"{collection.embedding_model}; this service embeds with {self.model}."
            )
        start = time.perf_counter()
        embedded = await self.embedder.embed.remote([request.query])
        timings["embed_ms"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        hits = await self.store.search(
            collection,
            embedded.vectors[0],
            request.top_k,
            request.filters,
            request.ef_search or self.ef_search,
        )
        timings["search_ms"] = (time.perf_counter() - start) * 1000
        keep = request.rerank_top_n
        if not request.rerank or not hits:
            return Retrieved(hits[:keep], None, timings)
        start = time.perf_counter()
        scored = await self.reranker.rerank.remote(request.query, [h.text for h in hits])
        timings["rerank_ms"] = (time.perf_counter() - start) * 1000
        order = sorted(range(len(hits)), key=lambda i: scored[i][0], reverse=True)
        order = order[:keep]  # None keeps all
        return Retrieved([hits[i] for i in order], [scored[i][0] for i in order], timings)
