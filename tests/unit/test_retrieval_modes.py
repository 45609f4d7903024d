"""The Retriever's modes and their cache keys (serve_app/pipelines/retrieval.py), no cluster."""

import asyncio
from dataclasses import dataclass

import numpy as np

from serve_app.config import AppConfig
from serve_app.contracts import Collection, Hit
from serve_app.pipelines.retrieval import Retriever
from serve_app.protocol.documents import SearchRequest

MODEL = AppConfig().embedder.model


@dataclass
class Embedded:
    vectors: np.ndarray
    model: str = MODEL


class Embedder:
    def __init__(self) -> None:
        self.calls = 0
        outer = self

        class Embed:
            def remote(self, texts):
                outer.calls += 1

                async def result():
                    return Embedded(np.ones((len(texts), 3), dtype=np.float32))

                return result()

        self.embed = Embed()


class Store:
    """Records which search ran; each answers one hit named after itself."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def collection(self, name: str) -> Collection:
        return Collection(1, name, MODEL, 3, version=7, uid="u")

    async def search(self, collection, vector, top_k, filters=None, ef_search=80):
        self.ran.append("dense")
        return [Hit(1, "dense", "t", {}, 0.9, dense_score=0.9)]

    async def keyword_search(self, collection, query, top_k, filters=None):
        self.ran.append("keyword")
        return [Hit(2, "keyword", "t", {}, 1.5, keyword_score=1.5)]

    async def hybrid_search(self, collection, vector, query, top_k, filters, ef, rrf_k, depth):
        self.ran.append(f"hybrid k={rrf_k}")
        return [Hit(3, "hybrid", "t", {}, 0.03, 0.9, 1.5, 1)]


def retriever(store: Store, embedder: Embedder, **retrieval) -> Retriever:
    return Retriever(embedder, None, store, AppConfig(retrieval=retrieval))


def ask(r: Retriever, **fields):
    return asyncio.run(r.retrieve(SearchRequest(collection="c", query="q", **fields)))


def test_each_mode_runs_its_search_and_keyword_embeds_nothing():
    store, embedder = Store(), Embedder()
    r = retriever(store, embedder)
    assert ask(r, mode="keyword").hits[0].document_id == "keyword"
    assert embedder.calls == 0
    assert ask(r, mode="dense").hits[0].document_id == "dense"
    answer = ask(r)  # the configured default
    assert answer.mode == "hybrid" and answer.hits[0].fused_rank == 1
    assert store.ran == ["keyword", "dense", "hybrid k=5"]


def test_cached_results_are_kept_apart_by_mode_and_rrf_k():
    store = Store()
    r = retriever(store, Embedder())
    for mode in ("dense", "keyword", "hybrid"):
        assert ask(r, mode=mode).cached_age_s is None  # no mode answers from another's entry
    cached = ask(r)  # no mode: the default's entry
    assert cached.cached_age_s is not None and cached.mode == "hybrid"
    assert cached.hits[0].keyword_score == 1.5  # the scores survive the cache
    # Another rrf_k sharing the cache keys differently (the key names it).
    other = retriever(store, Embedder(), rrf_k=10)
    other.cache = r.cache
    assert ask(other, mode="hybrid").cached_age_s is None
    assert store.ran[-1] == "hybrid k=10"
    assert retriever(store, Embedder(), mode="keyword").retrieval.mode == "keyword"
