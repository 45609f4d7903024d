"""Concurrent embedding requests of one ingress replica share one call to the Embedder.

Each `/v1/embeddings` request carrying a few inputs would otherwise cost a handle call of its
own: a round trip between two Python processes, a place in the Embedder's queue, and a
response to serialize, all for a few milliseconds of model time. Here the requests admitted
while a call is in flight wait in a `@serve.batch` queue and go out together as one call; the
answer is cut back into one `Embeddings` per request. A call that fails is made again request
by request, so one request's failure never fails the others; a replica that dies fails each
request as its own call would, and each caller's admission ticket calls again.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.config import Coalescing
from serve_app.contracts import Embeddings
from serve_app.protocol.errors import REPLICA_FAILURES


def texts_in(requests: list[list[str]]) -> int:
    return sum(len(texts) for texts in requests)


class EmbeddingCalls:
    """`embed(texts)` as the Embedder's `embed`, coalesced with concurrent calls."""

    def __init__(self, embedder: DeploymentHandle, settings: Coalescing) -> None:
        self.embedder = embedder
        # A queue of this object's own (a decorated method would share one per process). Up
        # to 8 calls in flight: the next ones gather while the Embedder answers.
        self._batch = serve.batch(
            max_batch_size=settings.max_inputs, max_concurrent_batches=8, batch_size_fn=texts_in
        )(self._call)
        self.configure(settings)

    def configure(self, settings: Coalescing) -> None:
        self.settings = settings
        self._batch.set_max_batch_size(settings.max_inputs)
        self._batch.set_batch_wait_timeout_s(settings.wait_ms / 1000)

    def embed(self, texts: list[str]) -> DeploymentResponse | asyncio.Task[Embeddings]:
        """The Embedder's `embed(texts)`: a handle call of its own, or a task awaiting a
        coalesced one. Either is awaited and cancelled like a handle call (cancelling the task
        leaves the coalesced call to the others)."""
        if not self.settings.enabled or len(texts) >= self.settings.max_inputs:
            return self.embedder.embed.remote(texts)
        return asyncio.ensure_future(self._coalesced(texts))

    async def _coalesced(self, texts: list[str]) -> Embeddings:
        result = await self._batch(texts)
        if isinstance(result, Exception):  # `@serve.batch` hands a failure back as a result
            raise result
        return result

    async def _call(self, requests: list[list[str]]) -> list[Embeddings | Exception]:
        if len(requests) == 1:
            return [await self.embedder.embed.remote(requests[0])]
        try:
            joined = await self.embedder.embed.remote([t for texts in requests for t in texts])
        except REPLICA_FAILURES as exc:  # each caller calls again, as for a call of its own
            return [exc] * len(requests)
        except Exception:  # each request alone: only its own failure fails it
            alone = [self.embedder.embed.remote(texts) for texts in requests]
            return list(await asyncio.gather(*alone, return_exceptions=True))
        return joined.split([len(texts) for texts in requests])
