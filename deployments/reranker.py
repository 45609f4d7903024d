"""The reranking model: scores (query, passage) pairs, higher is more relevant.

Two scorers share one interface:
- `QueryLikelihood`: exp(mean log P(query | passage)) under a causal LM, in (0, 1]. The offline
  default, because no trained cross-encoder ships in any package this project can install.
- `CrossEncoderScorer`: any sentence-transformers CrossEncoder (hub id or local path).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import torch
from ray import serve

from deployments import loading
from deployments.batching import BatchedModel, count_items, split, unflatten
from serve_app.config import RerankerConfig

Pair = tuple[str, str]
# Pairs per forward pass: bounds activation memory while long enough to keep the cores busy.
PAIRS_PER_FORWARD = 16


class Scorer(Protocol):
    module: torch.nn.Module

    def score(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        """(score, tokens read) per pair."""
        ...


class QueryLikelihood:
    """Relevance as how well the passage predicts the query, token by token."""

    PREFIX = "Passage: "
    BRIDGE = "\nA question this passage answers:"

    def __init__(self, config: RerankerConfig, cache_dir: Path, device: str, precision: str):
        self.tokenizer, self.module = loading.load_causal_lm(config, cache_dir, device, precision)
        self.device = device
        self.max_passage_tokens = config.max_passage_tokens
        self.max_query_tokens = config.max_query_tokens
        encode = self.tokenizer.encode
        self.prefix = encode(self.PREFIX, add_special_tokens=False)
        self.bridge = encode(self.BRIDGE, add_special_tokens=False)

    def score(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        encode = self.tokenizer.encode
        rows, query_lengths = [], []
        for query, passage in pairs:
            passage_ids = encode(passage, add_special_tokens=False)[: self.max_passage_tokens]
            query_ids = encode(" " + query, add_special_tokens=False)[: self.max_query_tokens]
            rows.append(self.prefix + passage_ids + self.bridge + query_ids)
            query_lengths.append(len(query_ids))
        # Left padding puts every query at the end of its row, so only the last
        # max(query_lengths) + 1 positions need logits.
        batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
        mask = batch["attention_mask"]
        keep = max(query_lengths) + 1
        with torch.inference_mode():
            logits = self.module(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=keep,
            ).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["input_ids"][:, -(keep - 1) :]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return [
            (token_logprobs[k, -n:].mean().exp().item() if n else 0.0, len(rows[k]))
            for k, n in enumerate(query_lengths)
        ]


class CrossEncoderScorer:
    def __init__(self, config: RerankerConfig, device: str, precision: str):
        from sentence_transformers import CrossEncoder

        self.encoder = CrossEncoder(
            loading.local_path(config.model),
            device=device,
            max_length=config.max_passage_tokens + config.max_query_tokens,
        )
        self.module = self.encoder.model.to(loading.DTYPES[precision]).eval()

    def score(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        scores = self.encoder.predict(pairs, batch_size=len(pairs), show_progress_bar=False)
        tokens = self.encoder.tokenizer(
            [q for q, _ in pairs],
            [p for _, p in pairs],
            truncation=True,
            max_length=self.encoder.max_length,
        )["input_ids"]
        return [(float(s), len(t)) for s, t in zip(scores, tokens, strict=True)]


@serve.deployment(max_ongoing_requests=64)
class Reranker(BatchedModel):
    """Scores passages against a query; pairs of concurrent requests share forward passes."""

    batched = "_score_batch"

    def __init__(self, config: RerankerConfig, cache_dir: Path) -> None:
        super().__init__()
        self.device = loading.pick_device(config)
        self.precision = loading.resolve_precision(config.precision, self.device)
        loading.set_threads(config.torch_threads)
        self.scorer: Scorer = (
            QueryLikelihood(config, cache_dir, self.device, self.precision)
            if config.backend == "query-likelihood"
            else CrossEncoderScorer(config, self.device, self.precision)
        )
        self.info = {
            "role": "rerank",
            "backend": config.backend,
            "model": config.name,
            "source": config.model,
            "precision": self.precision,
            "device": self.device,
            "threads": torch.get_num_threads(),
        }
        self.scorer.score([("warm up", "the kernels")] * 4)

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.scorer.module, self.device)

    async def rerank(self, query: str, passages: list[str]) -> list[tuple[float, int]]:
        """(score, tokens read) per passage, in the passages' order."""
        pairs = [(query, p) for p in passages]
        pieces = await asyncio.gather(
            *(self._score_batch(p) for p in split(pairs, self.max_batch_size))
        )
        return [s for piece in pieces for s in piece]

    # Start-up values; reconfigure() applies the deployment's user_config before any request.
    @serve.batch(**RerankerConfig().batching.model_dump(), batch_size_fn=count_items)
    async def _score_batch(self, requests: list[list[Pair]]) -> list[list[tuple[float, int]]]:
        flat = [pair for request in requests for pair in request]
        scores = await asyncio.to_thread(self._score_sorted, flat)
        self.record_batch(len(requests), len(flat))
        return unflatten(scores, requests)

    def _score_sorted(self, pairs: list[Pair]) -> list[tuple[float, int]]:
        # Score in length order so each forward pass pads little; return in input order.
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
        scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        for chunk in split(order, PAIRS_PER_FORWARD):
            for i, s in zip(chunk, self.scorer.score([pairs[i] for i in chunk]), strict=True):
                scores[i] = s
        return scores
