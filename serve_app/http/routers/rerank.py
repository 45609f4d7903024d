"""The rerank route, in the shape Cohere and Jina share (also at `/rerank`)."""

from __future__ import annotations

from fastapi import APIRouter

from serve_app.http.replica import ReplicaDep
from serve_app.protocol import limits
from serve_app.protocol.rerank import RerankRequest, RerankResponse

router = APIRouter()


@router.post("/v1/rerank")
@router.post("/rerank", include_in_schema=False)
async def rerank(request: RerankRequest, replica: ReplicaDep) -> RerankResponse:
    model = replica.served_name("reranker", request.model)
    limits.check_rerank(request, replica.settings.inputs)
    reranker = replica.handles.reranker
    async with replica.admission.admit("rerank") as ticket:
        scored = await ticket.call(
            lambda: reranker.rerank.remote(request.query, request.texts), request
        )
    return RerankResponse.of(request, model, scored)
