"""The document store's routes: ingest, delete a document, list and delete collections.

Every change to a collection drops its precomputed answers on this replica at once (other
replicas drop them on the store's notification).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from serve_app.http.replica import ReplicaDep
from serve_app.protocol import errors, limits
from serve_app.protocol.documents import (
    COLLECTION_PATTERN,
    CollectionInfo,
    CollectionList,
    Deleted,
    IngestRequest,
    IngestResponse,
)

router = APIRouter()


@router.post("/v1/documents")
async def ingest(request: IngestRequest, replica: ReplicaDep) -> IngestResponse:
    """Chunk, embed and store documents; an id already stored is replaced atomically."""
    limits.check_ingest(request, replica.settings.inputs)
    documents = replica.handles.documents
    async with replica.admission.admit("ingest") as ticket:
        # Idempotent: a document's id (or its text's hash) names it, and each request is
        # stored in one transaction, so a second try replaces what the first left, if any.
        try:
            max_chunks = replica.settings.inputs.max_chunks
            return await ticket.call(lambda: documents.ingest.remote(request, max_chunks), request)
        finally:  # even a failed ingest may have committed
            replica.popular.answers.forget(request.collection)


@router.delete("/v1/documents/{collection}/{document_id:path}")
async def delete_document(
    collection: Annotated[str, PathParam(pattern=COLLECTION_PATTERN)],
    document_id: Annotated[str, PathParam(min_length=1, max_length=256, pattern=r"^[^\x00]+$")],
    replica: ReplicaDep,
) -> Deleted:
    documents = replica.handles.documents
    async with replica.admission.admit("manage") as ticket:
        deleted = await ticket.result(documents.delete_document.remote(collection, document_id))
    if not deleted:  # nothing changed: the collection's answers stay valid
        raise errors.APIError(
            404,
            f"No document '{document_id}' in '{collection}'.",
            "not_found_error",
            param="document_id",
            code="document_not_found",
        )
    replica.popular.answers.forget(collection)
    return Deleted(id=document_id, object="document")


@router.get("/v1/collections")
async def collections(replica: ReplicaDep) -> CollectionList:
    async with replica.admission.admit("manage") as ticket:
        rows = await ticket.result(replica.handles.documents.collections.remote())
    return CollectionList(data=[CollectionInfo(**row) for row in rows])


@router.delete("/v1/collections/{name}")
async def delete_collection(
    name: Annotated[str, PathParam(pattern=COLLECTION_PATTERN)], replica: ReplicaDep
) -> Deleted:
    async with replica.admission.admit("manage") as ticket:
        await ticket.result(replica.handles.documents.delete_collection.remote(name))
    replica.popular.answers.forget(name)
    return Deleted(id=name, object="collection")
