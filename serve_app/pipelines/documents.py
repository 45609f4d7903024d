"""The documents route's deployment: chunk, embed and store documents; manage collections."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig, InputLimits
from serve_app.contracts import DocumentChunks
from serve_app.errors import TooManyChunks
from serve_app.protocol.documents import IngestedDocument, IngestRequest, IngestResponse
from serve_app.store import open_store


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.05})
class Documents:
    async def __init__(self, embedder: DeploymentHandle, config: AppConfig) -> None:
        self.embedder = embedder
        self.store = await open_store(config.store, "Documents")
        self.chunking = config.chunking
        self.text_search_config = config.retrieval.text_search_config  # of new collections

    async def ingest(
        self, request: IngestRequest, max_chunks: int = InputLimits().max_chunks
    ) -> IngestResponse:
        """Chunk by the embedder's tokens, embed every chunk (batched), store atomically.
        More than `max_chunks` chunks in all is a 400, before anything is embedded."""
        chunking = request.chunking or self.chunking
        texts = [d.text for d in request.documents]
        pieces = await self.embedder.chunk.remote(texts, chunking.max_tokens, chunking.overlap)
        flat = [chunk for doc_chunks in pieces for chunk in doc_chunks]
        if len(flat) > max_chunks:
            raise TooManyChunks(
                f"documents: at most {max_chunks} chunks per request, got {len(flat)}; "
                "send fewer documents per request, or larger chunks."
            )
        embedded = await self.embedder.embed.remote(flat, bulk=True)  # yields to queries
        collection = await self.store.ensure_collection(
            request.collection,
            embedded.model,
            embedded.vectors.shape[1],
            request.text_search_config,
            self.text_search_config,
        )
        documents, start = [], 0
        for doc, doc_chunks in zip(request.documents, pieces, strict=True):
            vectors = embedded.vectors[start : start + len(doc_chunks)]
            documents.append(DocumentChunks(doc.key, doc.metadata, doc_chunks, vectors))
            start += len(doc_chunks)
        await self.store.replace_documents(collection, documents)
        return IngestResponse(
            collection=request.collection,
            documents=[IngestedDocument(id=d.id, chunks=len(d.texts)) for d in documents],
            ingested=len(documents),
            chunks=len(flat),
        )

    async def delete_document(self, collection: str, document_id: str) -> bool:
        return await self.store.delete_document(
            await self.store.collection(collection), document_id
        )

    async def collections(self) -> list[dict]:
        return await self.store.list_collections()

    async def delete_collection(self, name: str) -> None:
        await self.store.delete_collection(name)
