"""Rerank scorers: how relevant each passage is to its query, higher is more. No Ray here.

Two scorers share one interface (`Scorer`):
- `QueryLikelihood`: exp(mean log P(query | passage)) under a causal LM, in (0, 1]. The offline
  default, because no trained cross-encoder ships in any package this project can install.
- `CrossEncoderScorer`: any sentence-transformers CrossEncoder (hub id or local path).

`load_scorer` builds the one a `RerankerConfig` names; `score_sorted` scores any number of
pairs in short forward passes. The `Reranker` deployment and the benchmarks call these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from deployments.engines import loading
from deployments.engines import precision as precision_
from serve_app.config import RerankerConfig

Pair = tuple[str, str]
# Pairs per forward pass, measured by scripts/bench_batch.py on the two CPUs of the reference
# machines. AMX, whose bf16 tiles want taller matrices (docs/benchmarks/batch.md): 6.5 pairs/s
# at 2 per pass, 8.3 at 8, 8.9 at 16 with 1.9x the peak memory of 8 (an earlier run the same day:
# 6.6, 12.9, 15.7). AVX-512 without AMX (the same script's report of 2026-11-21, AMD EPYC, in
# git history): 8.7 at 2, 8.5 at 8, 7.8 at 16. 8 is within 2% of the best without AMX and
# 1.3-1.95x 2 pairs with it.
PAIRS_PER_FORWARD = 8


class Scorer(Protocol):
    module: torch.nn.Module
    precision: precision_.Choice  # what it runs in, and how that was chosen
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


def load_scorer(config: RerankerConfig, cache_dir: Path, device: str) -> Scorer:
    """The scorer `config.backend` names, loaded at its precision on `device`."""
    if config.backend == "query-likelihood":
        return QueryLikelihood(config, cache_dir, device)
    return CrossEncoderScorer(config, cache_dir, device)


def score_sorted(
    scorer: Scorer, pairs: list[Pair], per_forward: int = PAIRS_PER_FORWARD
) -> list[tuple[float, int]]:
    """(score, tokens read) per pair, in the pairs' order, from forward passes of
    `per_forward` pairs taken in passage-length order, so each pass pads little."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for start in range(0, len(order), per_forward):
        chunk = order[start : start + per_forward]
        for i, s in zip(chunk, scorer.score([pairs[i] for i in chunk]), strict=True):
            scores[i] = s
    return scores
