"""The Embedder deployment: a sentence-transformers model (deployments/engines/embedding.py)
behind `@serve.batch`, the embedding cache and a live model or precision switch."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments.batching import BatchedModel, isolate
from deployments.engines import embedding, loading
from deployments.engines.batching import Piece, batch_cost, unwrap
from deployments.engines.embedding import EmbeddingModel
from serve_app.cache import EmbeddingCache, open_cache
from serve_app.chunking import Windows
from serve_app.config import CacheConfig, EmbedderConfig
from serve_app.contracts import Embeddings

# The longest a bulk forward pass waits for queries to finish before it starts anyway, so a
# steady stream of queries slows an ingest down but cannot stall it past its deadline.
BULK_YIELD_S = 0.5
logger = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=128)
class Embedder(BatchedModel):
    """Embeds texts; concurrent requests share forward passes through `@serve.batch`, and texts
    embedded before come from the embedding cache. Its user_config may name another `model` or
    `precision`: the new one loads beside the running one and takes over once warm.

    Two lanes: queries (search, RAG, classify, /v1/embeddings) and bulk work (ingest). Each has
    its own `@serve.batch` queue, so a query never queues behind an ingest's pieces, and bulk
    batches run one forward pass at a time, starting none while a query is being embedded."""

    batched = ("_embed_batch", "_bulk_batch")

    def __init__(self, config: EmbedderConfig, cache_dir: Path, caches: CacheConfig) -> None:
        super().__init__(config.batching)
        self.config, self.cache_dir = config, cache_dir
        # One cache (and Redis connection) for the replica; each loaded model has its own
        # namespace in it, so a switch neither reconnects nor serves the old model's vectors.
        self.cache_store = open_cache(caches, "embedding")
        self.device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        self.info.update(
            role="embedding", model=config.name, device=self.device, threads=torch.get_num_threads()
        )
        self.target = (config.model, config.precision)
        self.switching: asyncio.Task | None = None
        self.queries = 0  # query requests being embedded now
        self.no_queries = asyncio.Event()  # set while there are none: bulk passes may start
        self.no_queries.set()
        self._serve(self._bring_up(*self.target))
        self.loaded()

    @property
    def precision(self) -> str:
        return self.current.precision

    @property
    def cache(self) -> EmbeddingCache | None:
        return self.current_cache

    def _bring_up(self, source: str, requested: str) -> EmbeddingModel:
        """Load `source` at `requested` precision (`auto`: measured, or the stored choice),
        warm its kernels and size its forward passes."""
        return embedding.load(source, requested, self.device, self.cache_dir)

    def _serve(self, bundle: EmbeddingModel, requested: str | None = None) -> None:
        """Make `bundle` the model new requests use; the previous one is freed once the
        requests still holding it finish. Each model has its own namespace in the cache."""
        self.current = bundle
        self.current_cache = (
            EmbeddingCache(self.cache_store, f"{bundle.source}:{bundle.precision}")
            if self.cache_store
            else None
        )
        self.info.update(
            source=bundle.source,
            precision=bundle.precision,
            precision_requested=requested or self.target[1],
            precision_trials=bundle.trials,
            precision_measured=bundle.measured,
            dimensions=bundle.dimensions,
            max_input_tokens=bundle.max_tokens,
            since=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    async def reconfigure(self, user_config: dict) -> None:
        """Batch settings in place; another model or precision loads beside the running one
        (in a thread, so requests keep being answered) and is swapped in when warm."""
        settings = self.apply_batching(user_config)
        target = (settings.model or self.config.model, settings.precision or self.config.precision)
        if target == self.target:
            return
        self.target = target
        self.info["switching_to"] = {"source": target[0], "precision": target[1]}
        self.switching = asyncio.get_running_loop().create_task(self._switch(target))

    async def _switch(self, target: tuple[str, str]) -> None:
        try:
            bundle = await asyncio.to_thread(self._bring_up, *target)
        except Exception as exc:  # the running model stays; the failure shows in model_info
            logger.exception("Embedder: switching to %s at %s failed", *target)
            self.info["switch_error"] = f"{type(exc).__name__}: {exc}"
            self.info.pop("switching_to", None)
            return
        if target != self.target:  # a later switch superseded this one
            return
        self.info.pop("switching_to", None)
        self.info.pop("switch_error", None)
        self._serve(bundle, requested=target[1])
        logger.info("Embedder: now serving %s at %s", bundle.source, bundle.precision)

    def memory(self) -> dict[str, int]:
        return self.current.memory()

    async def embed(self, texts: list[str], bulk: bool = False) -> Embeddings:
        """Embed `texts`: cached ones from the cache, the rest in batches shared with other
        requests (a request larger than one batch is split and its pieces batched). One model
        serves the whole request, even if a switch lands meanwhile. `bulk` (ingest) work
        yields to queries."""
        if bulk:
            return await self._embed(texts, self._bulk_batch)
        self.queries += 1
        self.no_queries.clear()
        try:
            return await self._embed(texts, self._embed_batch)
        finally:
            self.queries -= 1
            if not self.queries:
                self.no_queries.set()

    async def _embed(
        self, texts: list[str], batch: Callable[[Piece[str]], Awaitable[np.ndarray]]
    ) -> Embeddings:
        current, cache = self.current, self.current_cache
        found = await cache.lookup(texts) if cache else [None] * len(texts)
        todo = [i for i, hit in enumerate(found) if hit is None]
        vectors = np.empty((len(texts), current.dimensions), dtype=np.float32)
        tokens = [0] * len(texts)
        for i, hit in enumerate(found):
            if hit is not None:
                vectors[i], tokens[i] = hit
        if todo:
            new_texts = [texts[i] for i in todo]
            # Counted off the event loop: 2048 long inputs take a while to tokenize.
            counts = await asyncio.to_thread(current.count_tokens, new_texts)
            pieces = [
                replace(piece, model=current)
                for piece in self.pieces(new_texts, [min(c, current.max_tokens) for c in counts])
            ]
            done = await asyncio.gather(*(batch(p) for p in pieces))
            new = np.concatenate(unwrap(done))
            vectors[todo] = new
            for i, count in zip(todo, counts, strict=True):
                tokens[i] = count
            if cache:
                await cache.store(new_texts, new, counts)
        return Embeddings(
            vectors=vectors,
            tokens=[min(t, current.max_tokens) for t in tokens],
            cut=[t > current.max_tokens for t in tokens],
            model=current.source,
            precision=current.precision,
        )

    def chunk(self, texts: list[str], max_tokens: int, overlap: int) -> list[list[str]]:
        """Cut each text into windows of at most `max_tokens` of this model's tokens
        (serve_app/chunking.py: overlap cut with the window, the last window ending at the
        text's end); chunks are spans of the text."""
        current = self.current
        windows = Windows.fit(max_tokens, overlap, current.max_tokens - 2)  # room for CLS/SEP
        offsets = current.counter(texts, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        chunks = []
        for text, spans in zip(texts, offsets, strict=True):
            pieces = [text[spans[i][0] : spans[j - 1][1]] for i, j in windows.spans(len(spans))]
            chunks.append(pieces or [text])
        return chunks

    # Start-up values only: __init__ applies the args' batching, reconfigure the user_config.
    @serve.batch(**EmbedderConfig().batching.serve_batch(), batch_size_fn=batch_cost)
    async def _embed_batch(self, pieces: list[Piece[str]]) -> list[np.ndarray | Exception]:
        return await isolate(pieces, lambda batch: self._embed_pieces(batch, self._encode_now))

    # The bulk lane: the same settings (reconfigure() applies them to both), its own queue.
    @serve.batch(**EmbedderConfig().batching.serve_batch(), batch_size_fn=batch_cost)
    async def _bulk_batch(self, pieces: list[Piece[str]]) -> list[np.ndarray | Exception]:
        return await isolate(pieces, lambda batch: self._embed_pieces(batch, self._encode_yielding))

    async def _encode_now(
        self, texts: list[str], tokens: list[int], loaded: EmbeddingModel
    ) -> np.ndarray:
        # The forward pass runs off the event loop, so the next batch queues up meanwhile.
        return await asyncio.to_thread(self._encode, texts, max(tokens), loaded)

    async def _encode_yielding(
        self, texts: list[str], tokens: list[int], loaded: EmbeddingModel
    ) -> np.ndarray:
        """`texts` one forward pass at a time, shortest first, each started once no query is
        being embedded (or after BULK_YIELD_S): a query never waits behind a bulk batch."""
        order = np.argsort(tokens, kind="stable")
        size = loaded.budget.items(max(tokens))
        vectors = np.empty((len(texts), loaded.dimensions), dtype=np.float32)
        for start in range(0, len(order), size):
            part = order[start : start + size]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BULK_YIELD_S):
                    await self.no_queries.wait()
            longest = max(tokens[i] for i in part)
            vectors[part] = await asyncio.to_thread(
                self._encode, [texts[i] for i in part], longest, loaded
            )
        return vectors

    async def _embed_pieces(
        self, pieces: list[Piece[str]], encode: Callable[..., Awaitable[np.ndarray]]
    ) -> list[np.ndarray]:
        # Pieces of requests that began before a switch keep the model they began with.
        out: list[np.ndarray] = [np.empty(0)] * len(pieces)
        groups: dict[int, list[int]] = {}
        for k, piece in enumerate(pieces):
            groups.setdefault(id(piece.model), []).append(k)
        for members in groups.values():
            group = [pieces[k] for k in members]
            flat = [text for piece in group for text in piece.items]
            tokens = [t for piece in group for t in piece.tokens]
            vectors = await encode(flat, tokens, group[0].model)
            for k, part in zip(
                members, np.split(vectors, np.cumsum([len(p) for p in group])[:-1]), strict=True
            ):
                out[k] = part
        self.record_batch(
            len(pieces), sum(len(p) for p in pieces), sum(sum(p.tokens) for p in pieces)
        )
        return out

    def _encode(
        self, texts: list[str], longest: int | None = None, loaded: EmbeddingModel | None = None
    ) -> np.ndarray:
        """The forward passes of every batch go through here (tests replace it to fail one)."""
        return (loaded or self.current).encode(texts, longest)
