"""The Reranker deployment: a scorer (deployments/engines/scoring.py) behind `@serve.batch`
and the response cache. Scores (query, passage) pairs, higher is more relevant."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

import torch
from ray import serve

from deployments.batching import BatchedModel, isolate
from deployments.engines import loading, scoring
from deployments.engines.batching import Piece, batch_cost, unflatten, unwrap
from deployments.engines.scoring import Pair, Scorer
from serve_app.cache import ResponseCache, open_cache
from serve_app.config import CacheConfig, RerankerConfig
from serve_app.contracts import RerankScore


@serve.deployment(max_ongoing_requests=64)
class Reranker(BatchedModel):
    """Scores passages against a query; pairs of concurrent requests share forward passes."""

    batched = ("_score_batch",)

    def __init__(self, config: RerankerConfig, cache_dir: Path, caches: CacheConfig) -> None:
        super().__init__(config.batching)
        self.device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        self.scorer: Scorer = scoring.load_scorer(config, cache_dir, self.device)
        self.precision = self.scorer.precision.precision
        store = open_cache(caches, "rerank")
        self.cache = ResponseCache(store, "rerank") if store else None
        self.namespace = f"v2:{config.backend}:{config.model}:{self.precision}"
        self.info.update(
            role="rerank",
            backend=config.backend,
            model=config.name,
            source=config.model,
            precision=self.precision,
            precision_requested=config.precision,
            precision_trials=[asdict(t) for t in self.scorer.precision.trials],
            precision_measured=self.scorer.precision.measured,
            device=self.device,
            threads=torch.get_num_threads(),
        )
        self.scorer.score([("warm up", "the kernels")] * 4)
        self.loaded()

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.scorer.module, self.device)

    async def rerank(self, query: str, passages: list[str]) -> list[RerankScore]:
        """A score per passage, in the passages' order; a query and passages scored before
        come from the response cache."""
        key = self.cache.key(self.namespace, {"q": query, "p": passages}) if self.cache else ""
        if self.cache and (hit := await self.cache.get(key)) is not None:
            return [RerankScore(*s) for s in hit["scores"]]
        # Cut to what the model reads, then counted off the event loop: tokenizing up to
        # max_documents long passages takes a while.
        query = query[: self.scorer.max_query_chars]
        pairs = [(query, p) for p in passages]
        counted = await asyncio.to_thread(self.scorer.count_tokens, pairs)
        pieces = self.pieces(pairs, [tokens for tokens, _ in counted])
        scored = unwrap(await asyncio.gather(*(self._score_batch(p) for p in pieces)))
        flat = [s for piece in scored for s in piece]
        scores = [RerankScore(s, t, cut) for (s, t), (_, cut) in zip(flat, counted, strict=True)]
        if self.cache:
            await self.cache.put(key, {"scores": scores})
        return scores

    # Start-up values only: __init__ applies the args' batching, reconfigure the user_config.
    @serve.batch(**RerankerConfig().batching.serve_batch(), batch_size_fn=batch_cost)
    async def _score_batch(
        self, pieces: list[Piece[Pair]]
    ) -> list[list[tuple[float, int]] | Exception]:
        return await isolate(pieces, self._score_pieces)

    async def _score_pieces(self, pieces: list[Piece[Pair]]) -> list[list[tuple[float, int]]]:
        flat = [pair for piece in pieces for pair in piece.items]
        scores = await asyncio.to_thread(self._score_sorted, flat)
        self.record_batch(len(pieces), len(flat), sum(sum(p.tokens) for p in pieces))
        return unflatten(scores, pieces)

    def _score_sorted(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        return scoring.score_sorted(self.scorer, pairs)
