"""Retrieval shared by the search and RAG routes: embed the query, search, optionally rerank."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
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

    async def retrieve(
        self,
        collection_name: str,
        query: str,
        top_k: int,
        filters: dict[str, Any] | None = None,
        rerank: bool = False,
        rerank_top_n: int | None = None,
        ef_search: int | None = None,
    ) -> Retrieved:
        """The `top_k` nearest chunks; reranked and cut to `rerank_top_n` when asked."""
        timings: dict[str, float] = {}
        collection = await self.store.collection(collection_name)
        if collection.embedding_model != self.model:
            raise ModelMismatch(
                f"The collection '{collection_name}' was embedded with "
                f"{collection.embedding_model}; this service embeds with {self.model}."
            )
        start = time.perf_counter()
        embedded = await self.embedder.embed.remote([query])
        timings["embed_ms"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        hits = await self.store.search(
            collection, embedded.vectors[0], top_k, filters, ef_search or self.ef_search
        )
        timings["search_ms"] = (time.perf_counter() - start) * 1000
        if not rerank or not hits:
            return Retrieved(hits[:rerank_top_n] if rerank_top_n else hits, None, timings)
        start = time.perf_counter()
        scored = await self.reranker.rerank.remote(query, [h.text for h in hits])
        timings["rerank_ms"] = (time.perf_counter() - start) * 1000
        order = sorted(range(len(hits)), key=lambda i: scored[i][0], reverse=True)
        order = order[:rerank_top_n] if rerank_top_n else order
        return Retrieved([hits[i] for i in order], [scored[i][0] for i in order], timings)
