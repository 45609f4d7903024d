"""The search route's deployment: the best chunks for a query (dense, keyword or hybrid),
optionally reranked."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.metrics import record_stages
from serve_app.pipelines.retrieval import Retriever
from serve_app.protocol.documents import (
    CacheInfo,
    SearchRequest,
    SearchResponse,
    SearchResult,
    Timings,
)
from serve_app.store import open_store


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.05})
class Search:
    async def __init__(
        self, embedder: DeploymentHandle, reranker: DeploymentHandle, config: AppConfig
    ) -> None:
        self.store = await open_store(config.store, "Search")
        self.retriever = Retriever(embedder, reranker, self.store, config)

    async def search(self, request: SearchRequest) -> SearchResponse:
        retrieved = await self.retriever.retrieve(request)
        record_stages("search", retrieved.timings)
        rerank_scores = retrieved.rerank_scores or [None] * len(retrieved.hits)
        results = [
            SearchResult(
                chunk_id=h.chunk_id,
                document_id=h.document_id,
                text=h.text,
                metadata=h.metadata,
                score=h.score,
                rerank_score=r,
                dense_score=h.dense_score,
                keyword_score=h.keyword_score,
                fused_rank=h.fused_rank,
            )
            for h, r in zip(retrieved.hits, rerank_scores, strict=True)
        ]
        age_s = retrieved.cached_age_s
        return SearchResponse(
            collection=request.collection,
            mode=retrieved.mode,
            results=results,
            timings=Timings(**retrieved.timings),
            cached=age_s is not None,
            cache=None if age_s is None else CacheInfo(source="response", age_s=round(age_s, 3)),
        )
