"""The embedding model: a sentence-transformers model returning normalized vectors."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments import loading, precision
from deployments.batching import BatchedModel, ForwardBudget, Piece, batch_cost, isolate, unwrap
from serve_app.cache import EmbeddingCache, open_cache
from serve_app.config import CacheConfig, EmbedderConfig

# Sentences per forward pass on CPU. sentence-transformers sorts a batch by length before
# cutting it into passes, so passes of similar-length inputs pad little. scripts/bench_batch.py
# on the 2-core reference machine (bf16, 128-sentence batches): 217 sentences/s in passes of 8,
# 196 in passes of 16, 146 in passes of 64 (docs/benchmarks/batch.md). On a GPU a batch is one
# pass, as far as free memory allows.
SENTENCES_PER_FORWARD = {"cpu": 8, "cuda": 1024}


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dim) float32, unit length
    tokens: list[int]  # tokens per input, after truncation
    truncated: int  # inputs cut at the model's max_seq_length


@serve.deployment(max_ongoing_requests=128)
class Embedder(BatchedModel):
    """Embeds texts; concurrent requests share forward passes through `@serve.batch`, and texts
    embedded before come from the embedding cache."""

    batched = "_embed_batch"

    def __init__(self, config: EmbedderConfig, cache_dir: Path, caches: CacheConfig) -> None:
        super().__init__()
        self.device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        path = loading.local_path(config.model)
        choice = precision.resolve(
            config.precision,
            self.device,
            f"sentence-transformer|{config.model}|{precision.device_signature(self.device)}",
            lambda p: self._load(path, p),
            self._probe,
            precision.mean_cosine,
            precision.MIN_MEAN_COSINE,
            cache_dir,
        )
        self.precision = choice.precision
        self.model = self._load(path, self.precision)
        self.dimensions = self.model.get_embedding_dimension()
        self.max_tokens = self.model.max_seq_length
        self.counter = loading.TokenCounter(self.model.tokenizer)
        store = open_cache(caches, "embedding")
        self.cache = EmbeddingCache(store, f"{config.model}:{self.precision}") if store else None
        self.info = {
            "role": "embedding",
            "model": config.name,
            "source": config.model,
            "precision": self.precision,
            "precision_requested": config.precision,
            "precision_trials": [asdict(t) for t in choice.trials],
            "precision_measured": choice.measured,
            "device": self.device,
            "threads": torch.get_num_threads(),
            "dimensions": self.dimensions,
            "max_input_tokens": self.max_tokens,
        }
        self.budget = ForwardBudget(SENTENCES_PER_FORWARD[self.device], self.device)
        self._encode(["warm up the kernels"] * 8)
        self.budget.measure(self._longest_forward)
        self.loaded()

    def _load(self, path: str, mode: str):
        from sentence_transformers import SentenceTransformer

        if mode in precision.BNB:
            model = SentenceTransformer(
                path, device=self.device, model_kwargs=precision.load_kwargs(mode, self.device)
            )
        else:
            model = SentenceTransformer(path, device=self.device)
        return precision.finish(model, mode, self.device)

    @staticmethod
    def _probe(model) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode(
                precision.calibration_sentences(),
                batch_size=SENTENCES_PER_FORWARD["cpu"],
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )

    def _longest_forward(self) -> int:
        """A forward pass of full-length inputs, to measure activation memory per token."""
        n = SENTENCES_PER_FORWARD["cpu"]
        self._encode(["lorem ipsum " * self.max_tokens] * n)
        return n * self.max_tokens

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.device)

    async def embed(self, texts: list[str]) -> Embeddings:
        """Embed `texts`: cached ones from the cache, the rest in batches shared with other
        requests (a request larger than one batch is split and its pieces batched)."""
        found = await self.cache.lookup(texts) if self.cache else [None] * len(texts)
        todo = [i for i, hit in enumerate(found) if hit is None]
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        tokens = [0] * len(texts)
        for i, hit in enumerate(found):
            if hit is not None:
                vectors[i], tokens[i] = hit
        if todo:
            new_texts = [texts[i] for i in todo]
            counts = self._count_tokens(new_texts)
            pieces = self.pieces(new_texts, [min(c, self.max_tokens) for c in counts])
            done = await asyncio.gather(*(self._embed_batch(p) for p in pieces))
            new = np.concatenate(unwrap(done))
            vectors[todo] = new
            for i, count in zip(todo, counts, strict=True):
                tokens[i] = count
            if self.cache:
                await self.cache.store(new_texts, new, counts)
        return Embeddings(
            vectors=vectors,
            tokens=[min(t, self.max_tokens) for t in tokens],
            truncated=sum(t > self.max_tokens for t in tokens),
        )

    def _count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model would read it untruncated, special tokens included."""
        return [len(ids) for ids in self.counter(texts)["input_ids"]]

    # Start-up values; reconfigure() applies the deployment's user_config before any request.
    def chunk(self, texts: list[str], max_tokens: int, overlap: int) -> list[list[str]]:
        """Cut each text into windows of at most `max_tokens` of this model's tokens, each
        starting `max_tokens - overlap` tokens after the last; chunks are spans of the text."""
        max_tokens = min(max_tokens, self.model.max_seq_length - 2)  # room for [CLS]/[SEP]
        step = max(1, max_tokens - overlap)
        offsets = self.counter(texts, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        chunks = []
        for text, spans in zip(texts, offsets, strict=True):
            starts = range(0, max(1, len(spans) - overlap), step) if spans else []
            pieces = [
                text[spans[i][0] : spans[min(i + max_tokens, len(spans)) - 1][1]] for i in starts
            ]
            chunks.append(pieces or [text])
        return chunks

    @serve.batch(**EmbedderConfig().batching.serve_batch(), batch_size_fn=batch_cost)
    async def _embed_batch(self, pieces: list[Piece[str]]) -> list[np.ndarray | Exception]:
        return await isolate(pieces, self._embed_pieces)

    async def _embed_pieces(self, pieces: list[Piece[str]]) -> list[np.ndarray]:
        flat = [text for piece in pieces for text in piece.items]
        longest = max(t for piece in pieces for t in piece.tokens)
        # The forward pass runs off the event loop, so the next batch queues up meanwhile.
        vectors = await asyncio.to_thread(self._encode, flat, longest)
        self.record_batch(len(pieces), len(flat), sum(sum(p.tokens) for p in pieces))
        return np.split(vectors, np.cumsum([len(p) for p in pieces])[:-1])

    def _encode(self, texts: list[str], longest: int | None = None) -> np.ndarray:
        with torch.inference_mode():
            vectors = self.model.encode(
                texts,
                batch_size=self.budget.items(longest or self.max_tokens),
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        # Re-normalize in fp32: unit length must hold whatever precision the model ran in.
        return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()
