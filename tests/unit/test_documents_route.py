"""The Documents deployment's chunk cap (serve_app/pipelines/documents.py), without a cluster."""

import asyncio

import pytest

from serve_app.config import Chunking
from serve_app.errors import TooManyChunks
from serve_app.pipelines.documents import Documents
from serve_app.protocol.documents import IngestRequest


class Method:
    def __init__(self, result) -> None:
        self.result, self.calls = result, 0

    def remote(self, *args):
        self.calls += 1

        async def call():
            return self.result(*args)

        return call()


class Embedder:
    def __init__(self, chunks_per_text: int) -> None:
        self.chunk = Method(lambda texts, *_: [["c"] * chunks_per_text for _ in texts])
        self.embed = Method(lambda texts: pytest.fail("embedded past the chunk cap"))


def test_an_ingest_past_the_chunk_cap_is_refused_before_embedding():
    documents = object.__new__(Documents.func_or_class)
    documents.embedder, documents.chunking = Embedder(chunks_per_text=30), Chunking()
    request = IngestRequest(collection="c", documents=[{"text": "a"}, {"text": "b"}])
    with pytest.raises(TooManyChunks) as refused:
        asyncio.run(documents.ingest(request, max_chunks=59))
    assert refused.value.status == 400 and "60" in str(refused.value)
    assert documents.embedder.embed.calls == 0
