"""What the model deployments share on the Serve side: live batch settings over
`@serve.batch`, per-piece failure isolation, and the `model_info` report.

The arithmetic (pieces, their cost, forward-pass budgets) is Ray-free, in
`deployments/engines/batching.py`. A batch that fails is run again piece by piece
(`isolate`), so one bad request fails alone and the others in its batch are answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.engines.batching import BatchStats, Piece, split
from serve_app.cache import EmbeddingCache, ResponseCache
from serve_app.config import Batching, ModelLive, overlay
from serve_app.metrics import batch_sizes, batch_tokens

T = TypeVar("T")
R = TypeVar("R")
logger = logging.getLogger("ray.serve")


async def isolate(
    pieces: Sequence[Piece[T]], run: Callable[[Sequence[Piece[T]]], Awaitable[list[R]]]
) -> list[R | Exception]:
    """`run(pieces)`: one result per piece. If the batch fails, each piece runs alone, and a
    piece that fails alone gets its exception as its result (`@serve.batch` hands results,
    exceptions included, to their callers as they are; `unwrap` raises them there)."""
    try:
        return list(await run(pieces))
    except Exception as exc:
        if len(pieces) == 1:
            raise
        logger.warning("A batch of %d failed (%r); retrying its pieces alone", len(pieces), exc)
    results: list[R | Exception] = []
    for piece in pieces:
        try:
            results.extend(await run([piece]))
        except Exception as exc:
            results.append(exc)
    return results


def deployment_name(default: str) -> str:
    """The Serve deployment this replica belongs to (two Generator deployments run one class),
    or `default` outside Serve (tests, benchmarks)."""
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return default
    return getattr(context, "deployment", default)


class BatchedModel:
    """What the three model deployments share: live batch settings and a `model_info` report.

    Subclasses set `batched` to the names of their `@serve.batch` methods (the settings apply
    to each), pass their args' `batching` to `__init__`, and add to `info` after loading
    their model. The live settings are the `user_config` laid over those defaults
    (`serve_app.config.overlay`), in `__init__` as in `reconfigure`: a field the
    `user_config` omits keeps the model's own default.
    """

    batched: tuple[str, ...]
    cache: EmbeddingCache | ResponseCache | None = None  # set by models that cache
    max_batch_size: int
    max_batch_tokens: int

    def __init__(self, defaults: Batching) -> None:
        self.stats = BatchStats()
        self.info: dict[str, object] = {}
        self.deployment = deployment_name(type(self).__name__)
        self.started = time.perf_counter()
        self.defaults = ModelLive.model_validate(defaults.model_dump())
        self.apply_batching({})

    def pieces(self, items: Sequence[T], tokens: Sequence[int]) -> list[Piece[T]]:
        """`items` split into pieces that fit one batch under the current settings."""
        # One item, however long, must fit: the token bound never goes under the longest.
        max_tokens = max(self.max_batch_tokens, *tokens, 1)
        return split(items, tokens, self.max_batch_size, max_tokens)

    def loaded(self) -> None:
        """Called at the end of a subclass's __init__: loading and warm-up are done."""
        self.info["load_s"] = round(time.perf_counter() - self.started, 2)

    def record_batch(self, requests: int, items: int, tokens: int = 0) -> None:
        """One executed batch: into the counters of `model_info` and the histograms of items
        and tokens per batch."""
        self.stats.record(requests, items, tokens)
        tags = {"deployment": self.deployment}
        batch_sizes().observe(items, tags=tags)
        batch_tokens().observe(tokens, tags=tags)

    def reconfigure(self, user_config: dict) -> None:
        """Apply `user_config` to the running batcher, without a restart. Only the Embedder
        switches model or precision live; here they need a change of `args` (a restart)."""
        settings = self.apply_batching(user_config)
        if settings.model is not None or settings.precision is not None:
            raise ValueError(
                f"{type(self).__name__} cannot switch model or precision live: set them in "
                "the application's args (which restarts its replicas)"
            )

    def apply_batching(self, user_config: dict) -> ModelLive:
        """`user_config` laid over the args' defaults, its batch settings in effect from now."""
        settings = overlay(self.defaults, user_config)
        for name in self.batched:
            method = getattr(self, name)
            method.set_max_batch_size(settings.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.max_batch_size = settings.max_batch_size
        self.max_batch_tokens = settings.max_batch_tokens
        self.info["batching"] = Batching.model_validate(
            settings.model_dump(include=set(Batching.model_fields))
        ).model_dump()
        return settings

    def model_info(self) -> dict[str, object]:
        """Model, precision, device, memory and the executed batch sizes so far."""
        cache = self.cache.snapshot() if self.cache else None
        return {
            **self.info,
            "memory": self.memory(),
            "batches": self.stats.snapshot(),
            "cache": cache,
        }

    def memory(self) -> dict[str, int]:
        raise NotImplementedError
