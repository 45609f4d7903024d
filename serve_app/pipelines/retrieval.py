"""Retrieval shared by the search and RAG routes: embed the query, search, optionally rerank.

A request's `mode` (default `retrieval.mode`) picks the search: dense (vectors), keyword
(PostgreSQL full text; nothing is embedded) or hybrid (both, fused by reciprocal rank).
Results are kept in the response cache under the collection's id and version; every change to
a collection's documents bumps its version, so a cached result never outlives the data.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from ray.serve.handle import DeploymentHandle

from serve_app.cache import ResponseCache, open_cache
from serve_app.config import AppConfig
from serve_app.contracts import Collection, Hit, Retrieved, ranked
from serve_app.errors import ModelMismatch
from serve_app.protocol.documents import RetrievalRequest
from serve_app.store.vector_store import VectorStore


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
        self.ef_search = config.store.ef_search
        self.retrieval = config.retrieval
        # What else shapes a result, for the cache key: the query's embedding (model and
        # precision) and the reranker's scores.
        e, r = config.embedder, config.reranker
        self.models = {
            "embedder": [e.model, e.precision],
            "reranker": [r.backend, r.model, r.precision, r.max_query_tokens, r.max_passage_tokens],
            "fusion": [config.retrieval.rrf_k, config.retrieval.candidates],
        }
        store = open_cache(config.cache, "search")
        self.cache = ResponseCache(store, "search") if store else None

    async def retrieve(self, request: RetrievalRequest) -> Retrieved:
        """The `top_k` best chunks by the request's mode; reranked and cut to `rerank_top_n` when
        asked."""
        collection = await self.store.collection(request.collection)
        # The mode in effect, not the one asked: a request without one and one naming the
        # default share a cache entry, and a changed default never serves the old one's.
        request = request.model_copy(update={"mode": request.mode or self.retrieval.mode})
        if not self.cache:
            return await self._retrieve(collection, request)
        # The collection's uid, not its id: ids repeat across databases (a shared Redis, a
        # database recreated), uids never do.
        key = self.cache.key(
            f"{collection.uid}:{collection.version}",
            {
                **request.model_dump(mode="json", exclude={"collection"}),
                "embedding_model": collection.embedding_model,
                "models": self.models,
            },
        )
        if (hit := await self.cache.get(key)) is not None:
            hits = [Hit(**h) for h in hit["hits"]]
            age_s = max(0.0, time.time() - hit.get("stored_at", time.time()))
            return Retrieved(hits, hit["rerank_scores"], {}, cached_age_s=age_s, mode=request.mode)
        retrieved = await self._retrieve(collection, request)
        value = {
            "hits": [asdict(h) for h in retrieved.hits],
            "rerank_scores": retrieved.rerank_scores,
            "stored_at": time.time(),
        }
        await self.cache.put(key, value)
        return retrieved

    async def _retrieve(self, collection: Collection, request: RetrievalRequest) -> Retrieved:
        timings: dict[str, float] = {}
        mode = request.mode or self.retrieval.mode
        if mode == "keyword":
            start = time.perf_counter()
            hits = await self.store.keyword_search(
                collection, request.query, request.top_k, request.filters
            )
        else:
            start = time.perf_counter()
            embedded = await self.embedder.embed.remote([request.query])
            timings["embed_ms"] = (time.perf_counter() - start) * 1000
            # The model that embedded the query, which a live switch may have changed.
            if embedded.model != collection.embedding_model:
                raise ModelMismatch(
                    f"The collection '{collection.name}' was embedded with "
                    f"{collection.embedding_model}; this service embeds with {embedded.model}."
                )
            start = time.perf_counter()
            ef_search = request.ef_search or self.ef_search
            if mode == "dense":
                hits = await self.store.search(
                    collection, embedded.vectors[0], request.top_k, request.filters, ef_search
                )
            else:
                hits = await self.store.hybrid_search(
                    collection,
                    embedded.vectors[0],
                    request.query,
                    request.top_k,
                    request.filters,
                    ef_search,
                    self.retrieval.rrf_k,
                    self.retrieval.candidates,
                )
        timings["search_ms"] = (time.perf_counter() - start) * 1000
        keep = request.rerank_top_n
        if not request.rerank or not hits:
            return Retrieved(hits[:keep], None, timings, mode=mode)
        start = time.perf_counter()
        scored = await self.reranker.rerank.remote(request.query, [h.text for h in hits])
        timings["rerank_ms"] = (time.perf_counter() - start) * 1000
        order = ranked(scored, keep)
        return Retrieved(
            [hits[i] for i in order], [scored[i].score for i in order], timings, mode=mode
        )
