"""The reranking model: scores (query, passage) pairs, higher is more relevant.

Two scorers share one interface:
- `QueryLikelihood`: exp(mean log P(query | passage)) under a causal LM, in (0, 1]. The offline
  default, because no trained cross-encoder ships in any package this project can install.
- `CrossEncoderScorer`: any sentence-transformers CrossEncoder (hub id or local path).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from ray import serve

from deployments import loading
from deployments import precision as precision_
from deployments.batching import BatchedModel, Piece, batch_cost, isolate, unflatten, unwrap
from serve_app.cache import ResponseCache, open_cache
from serve_app.config import CacheConfig, RerankerConfig
from serve_app.contracts import RerankScore

Pair = tuple[str, str]
# Pairs per forward pass. On CPU, larger passes buy no speed and cost memory: 8.7 pairs/s at 2
# per pass, 7.8 at 16 with 3.5x the peak memory (scripts/bench_batch.py, docs/benchmarks/batch.md).
PAIRS_PER_FORWARD = 2


class Scorer(Protocol):
    module: torch.nn.Module
    precision: precision_.Choice
    max_query_chars: int  # a query's characters past this are never read

    def score(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        """(score, tokens read) per pair."""
        ...

    def count_tokens(self, pairs: list[Pair]) -> list[tuple[int, bool]]:
        """Per pair: the tokens the model reads, and whether the pair was cut to fit."""
        ...


class QueryLikelihood:
    """Relevance as how well the passage predicts the query, token by token."""

    PREFIX = "Passage: "
    BRIDGE = "\nA question this passage answers:"

    def __init__(self, config: RerankerConfig, cache_dir: Path, device: str):
        self.tokenizer = loading.load_tokenizer(config, cache_dir)
        self.counter = loading.TokenCounter(self.tokenizer)
        self.precision = loading.causal_lm_precision(config, cache_dir, device, self.tokenizer)
        self.module = loading.load_causal_lm(config, cache_dir, device, self.precision.precision)
        self.device = device
        self.max_passage_tokens = config.max_passage_tokens
        self.max_query_tokens = config.max_query_tokens
        encode = self.tokenizer.encode
        self.prefix = encode(self.PREFIX, add_special_tokens=False)
        self.bridge = encode(self.BRIDGE, add_special_tokens=False)
        # Texts are cut to what the model can read before they are tokenized (+1: the space
        # before a query), so a long input costs no more than a short one.
        chars = loading.max_token_chars(self.tokenizer)
        self.max_query_chars = (self.max_query_tokens + 1) * chars
        self.max_passage_chars = (self.max_passage_tokens + 1) * chars

    def _ids(self, pairs: list[Pair], tokenize) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each pair's passage and query, uncut; each distinct query once."""
        passages = tokenize([p[: self.max_passage_chars] for _, p in pairs])
        distinct = list(dict.fromkeys(q[: self.max_query_chars] for q, _ in pairs))
        by_query = dict(zip(distinct, tokenize([" " + q for q in distinct]), strict=True))
        return passages, [by_query[q[: self.max_query_chars]] for q, _ in pairs]

    def count_tokens(self, pairs: list[Pair]) -> list[tuple[int, bool]]:
        fixed = len(self.prefix) + len(self.bridge)
        passages, queries = self._ids(
            pairs, lambda texts: self.counter(texts, add_special_tokens=False)["input_ids"]
        )
        return [
            (
                fixed + min(len(p), self.max_passage_tokens) + min(len(q), self.max_query_tokens),
                # A passage longer than the cut is over max_passage_tokens, whatever its tokens.
                len(p) > self.max_passage_tokens
                or len(q) > self.max_query_tokens
                or len(passage) > self.max_passage_chars,
            )
            for p, q, (_, passage) in zip(passages, queries, pairs, strict=True)
        ]

    def score(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        passages, queries = self._ids(
            pairs, lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        )
        rows, query_lengths = [], []
        for passage_ids, query_ids in zip(passages, queries, strict=True):
            query_ids = query_ids[: self.max_query_tokens]
            rows.append(
                self.prefix + passage_ids[: self.max_passage_tokens] + self.bridge + query_ids
            )
            query_lengths.append(len(query_ids))
        # Left padding puts every query at the end of its row, so only the last
        # max(query_lengths) + 1 positions need logits.
        batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
        token_logprobs = loading.tail_logprobs(self.module, batch, max(query_lengths))
        return [
            (token_logprobs[k, -n:].mean().exp().item() if n else 0.0, len(rows[k]))
            for k, n in enumerate(query_lengths)
        ]


class CrossEncoderScorer:
    def __init__(self, config: RerankerConfig, cache_dir: Path, device: str):
        self.config, self.device = config, device
        sentences = precision_.calibration_sentences()
        calibration = [(q, p) for q, p in zip(sentences[::2], sentences[1::2], strict=False)]
        self.precision = precision_.resolve(
            config.precision,
            device,
            f"cross-encoder|{config.model}|{precision_.device_signature(device)}",
            self._load,
            lambda encoder: torch.as_tensor(encoder.predict(calibration, show_progress_bar=False)),
            precision_.spearman,
            precision_.MIN_SPEARMAN,
            cache_dir,
        )
        self.encoder = self._load(self.precision.precision)
        self.module = self.encoder
        self.counter = loading.TokenCounter(self.encoder.tokenizer)
        self.max_query_chars = self.encoder.max_length * loading.max_token_chars(
            self.encoder.tokenizer
        )

    def _load(self, mode: str):
        from sentence_transformers import CrossEncoder

        encoder = CrossEncoder(
            loading.local_path(self.config.model),
            device=self.device,
            max_length=self.config.max_passage_tokens + self.config.max_query_tokens,
            model_kwargs=precision_.load_kwargs(mode, self.device)
            if mode in precision_.BNB
            else None,
        )
        return precision_.finish(encoder, mode, self.device)

    def count_tokens(self, pairs: list[Pair]) -> list[tuple[int, bool]]:
        limit = self.encoder.max_length
        whole = self.counter([q for q, _ in pairs], [p for _, p in pairs], verbose=False)
        return [(min(len(ids), limit), len(ids) > limit) for ids in whole["input_ids"]]

    def score(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        scores = self.encoder.predict(pairs, batch_size=len(pairs), show_progress_bar=False)
        counted = self.count_tokens(pairs)
        return [(float(s), t) for s, (t, _) in zip(scores, counted, strict=True)]


@serve.deployment(max_ongoing_requests=64)
class Reranker(BatchedModel):
    """Scores passages against a query; pairs of concurrent requests share forward passes."""

    batched = ("_score_batch",)

    def __init__(self, config: RerankerConfig, cache_dir: Path, caches: CacheConfig) -> None:
        super().__init__()
        self.device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        self.scorer: Scorer = (
            QueryLikelihood(config, cache_dir, self.device)
            if config.backend == "query-likelihood"
            else CrossEncoderScorer(config, cache_dir, self.device)
        )
        self.precision = self.scorer.precision.precision
        store = open_cache(caches, "rerank")
        self.cache = ResponseCache(store, "rerank") if store else None
        self.namespace = f"v2:{config.backend}:{config.model}:{self.precision}"
        self.info = {
            "role": "rerank",
            "backend": config.backend,
            "model": config.name,
            "source": config.model,
            "precision": self.precision,
            "precision_requested": config.precision,
            "precision_trials": [asdict(t) for t in self.scorer.precision.trials],
            "precision_measured": self.scorer.precision.measured,
            "device": self.device,
            "threads": torch.get_num_threads(),
        }
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

    # Start-up values; reconfigure() applies the deployment's user_config before any request.
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
        # Score in length order so each forward pass pads little; return in input order.
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
        scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        for start in range(0, len(order), PAIRS_PER_FORWARD):
            chunk = order[start : start + PAIRS_PER_FORWARD]
            for i, s in zip(chunk, self.scorer.score([pairs[i] for i in chunk]), strict=True):
                scores[i] = s
        return scores
