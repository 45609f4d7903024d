"""The embedding model: a sentence-transformers model returning normalized vectors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments import loading
from deployments.batching import BatchedModel, count_items, split, unflatten
from serve_app.config import EmbedderConfig

# Sentences per forward pass. sentence-transformers sorts a batch by length before cutting it
# into passes, so passes of similar-length inputs pad little: in the raw phase of
# scripts/bench_serving.py, 64-sentence batches ran at ~119 sentences/s as one pass and ~170
# in passes of 16 (1 thread, bf16).
SENTENCES_PER_FORWARD = 16


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dim) float32, unit length
    tokens: list[int]  # tokens per input, after truncation
    truncated: int  # inputs cut at the model's max_seq_length


@serve.deployment(max_ongoing_requests=128)
class Embedder(BatchedModel):
    """Embeds texts; concurrent requests share one forward pass through `@serve.batch`."""

    batched = "_embed_batch"

    def __init__(self, config: EmbedderConfig, cache_dir: Path) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.device = loading.pick_device(config)
        self.precision = loading.resolve_precision(config.precision, self.device)
        loading.set_threads(config.torch_threads)
        model = SentenceTransformer(loading.local_path(config.model), device=self.device)
        self.model = model.to(loading.DTYPES[self.precision]).eval()
        self.dimensions = self.model.get_embedding_dimension()
        self.info = {
            "role": "embedding",
            "model": config.name,
            "source": config.model,
            "precision": self.precision,
            "device": self.device,
            "threads": torch.get_num_threads(),
            "dimensions": self.dimensions,
            "max_input_tokens": self.model.max_seq_length,
        }
        self._encode(["warm up the kernels"] * 8)

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.device)

    async def embed(self, texts: list[str]) -> Embeddings:
        """Embed `texts`; a request larger than one batch is split and its pieces batched."""
        pieces = await asyncio.gather(
            *(self._embed_batch(p) for p in split(texts, self.max_batch_size))
        )
        return Embeddings(
            vectors=np.concatenate([p.vectors for p in pieces]),
            tokens=[t for p in pieces for t in p.tokens],
            truncated=sum(p.truncated for p in pieces),
        )

    # Start-up values; reconfigure() applies the deployment's user_config before any request.
    def chunk(self, texts: list[str], max_tokens: int, overlap: int) -> list[list[str]]:
        """Cut each text into windows of at most `max_tokens` of this model's tokens, each
        starting `max_tokens - overlap` tokens after the last; chunks are spans of the text."""
        max_tokens = min(max_tokens, self.model.max_seq_length - 2)  # room for [CLS]/[SEP]
        step = max(1, max_tokens - overlap)
        offsets = self.model.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True
        )["offset_mapping"]
        chunks = []
        for text, spans in zip(texts, offsets, strict=True):
            starts = range(0, max(1, len(spans) - overlap), step) if spans else []
            pieces = [
                text[spans[i][0] : spans[min(i + max_tokens, len(spans)) - 1][1]] for i in starts
            ]
            chunks.append(pieces or [text])
        return chunks

    @serve.batch(**EmbedderConfig().batching.model_dump(), batch_size_fn=count_items)
    async def _embed_batch(self, requests: list[list[str]]) -> list[Embeddings]:
        flat = [text for request in requests for text in request]
        # The forward pass runs off the event loop, so the next batch queues up meanwhile.
        vectors, tokens = await asyncio.to_thread(self._encode, flat)
        self.record_batch(len(requests), len(flat))
        limit = self.model.max_seq_length
        out, start = [], 0
        for request, request_tokens in zip(requests, unflatten(tokens, requests), strict=True):
            out.append(
                Embeddings(
                    vectors=vectors[start : start + len(request)],
                    tokens=[min(t, limit) for t in request_tokens],
                    truncated=sum(t > limit for t in request_tokens),
                )
            )
            start += len(request)
        return out

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        tokens = [len(ids) for ids in self.model.tokenizer(texts)["input_ids"]]
        with torch.inference_mode():
            vectors = self.model.encode(
                texts,
                batch_size=SENTENCES_PER_FORWARD,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        # Re-normalize in fp32: unit length must hold whatever precision the model ran in.
        vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        return vectors.cpu().numpy(), tokens
