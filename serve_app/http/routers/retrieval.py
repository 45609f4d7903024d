"""Search and RAG answers, and the same requests run at background priority for the
Precompute job.

A search or RAG request is first looked up among the precomputed answers of popular requests
(answered from memory, no slot taken), and otherwise counted and run by its pipeline
deployment under the route's admission.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from serve_app.config import AppConfig, IngressLive
from serve_app.contracts import Delta, Generated, Sources
from serve_app.http import sse
from serve_app.http.replica import Replica, ReplicaDep
from serve_app.precompute.store import Answer
from serve_app.protocol import limits
from serve_app.protocol.documents import (
    CacheInfo,
    RagRequest,
    RagResponse,
    SearchRequest,
    SearchResponse,
)

router = APIRouter()


@router.post("/v1/search", response_model=SearchResponse)
async def search(request: SearchRequest, replica: ReplicaDep):
    """Nearest chunks by cosine (HNSW), metadata filters, optional rerank."""
    limits.check_retrieval(request, replica.settings.inputs)
    asked = replica.popular.ask("search", request)
    if (answer := replica.popular.lookup(asked)) is not None:
        return precomputed(answer)  # no model runs: no slot taken
    pipeline = replica.handles.search
    async with replica.admission.admit("search") as ticket:
        replica.popular.count(asked)  # only what was answered or admitted: a 503 is not asked
        return await ticket.call(lambda: pipeline.search.remote(request), request)


@router.post("/v1/rag/query", response_model=RagResponse)
async def rag_query(request: RagRequest, replica: ReplicaDep):
    """Retrieve, rerank, and answer citing sources by number; SSE with `stream`."""
    request = rag_request(request, replica.settings, replica.config)
    asked = replica.popular.ask("rag", request)
    if (answer := replica.popular.lookup(asked)) is not None:
        return precomputed(answer, request.stream)
    async with replica.admission.admit("rag") as ticket:
        replica.popular.count(asked)
        events = ticket.track(replica.handles.rag.options(stream=True).answer.remote(request))
        sources: Sources = await ticket.wait(anext(events))  # retrieval errors: a status
        if request.stream:
            stream = ticket.stream(sse.rag_events(sources, events))
            return StreamingResponse(stream, media_type="text/event-stream")
        return await ticket.wait(rag_answer(sources, events))


def rag_request(request: RagRequest, settings: IngressLive, config: AppConfig) -> RagRequest:
    """The request checked against the input limits, with its max_tokens default filled."""
    limits.check_retrieval(request, settings.inputs)
    cap = config.generator.max_new_tokens
    limits.check_max_tokens(request.max_tokens, cap)
    return request.model_copy(update={"max_tokens": request.max_tokens or min(256, cap)})


async def rag_answer(sources: Sources, events: AsyncIterator) -> RagResponse:
    """The whole answer from the Rag deployment's events after its sources."""
    text, last, generated = "", None, None
    async for event in events:
        if isinstance(event, Delta):
            text, last = text + event.text, event
        elif isinstance(event, Generated):
            generated = event
    assert last is not None and generated is not None
    return RagResponse.of(sources, text, last, generated)


def precomputed(answer: Answer, stream: bool = False) -> Response:
    """A precomputed answer as JSON, or for a streamed RAG request as its SSE events, saying
    where it came from and its age (also the `Age` header)."""
    cache = CacheInfo(source="precomputed", age_s=round(answer.age_s, 3))
    headers = {"Age": str(int(answer.age_s))}
    if stream:
        events = sse.precomputed_rag(answer.body, cache)
        return Response(events, media_type="text/event-stream", headers=headers)
    body = orjson.dumps({**answer.body, "cached": True, "cache": cache.model_dump()})
    return Response(body, media_type="application/json", headers=headers)


async def run_background(replica: Replica, kind: str, request: dict) -> dict[str, Any] | None:
    """Run a counted search or RAG request for the Precompute job at background priority
    (admission.background): its answer without cache fields, or None where the route had no
    free slot or a client took it."""
    if kind == "search":
        parsed: SearchRequest | RagRequest = SearchRequest(**request)
    else:
        rag = RagRequest(**{**request, "stream": False})
        parsed = rag_request(rag, replica.settings, replica.config)
    ticket = replica.admission.background(kind)  # the routes are named as the kinds
    if ticket is None:
        return None
    try:
        if kind == "search":
            answer = await ticket.result(replica.handles.search.search.remote(parsed))
        else:
            events = ticket.track(replica.handles.rag.options(stream=True).answer.remote(parsed))
            answer = await ticket.wait(rag_answer(await ticket.wait(anext(events)), events))
    except Exception:
        if ticket.preempted:
            return None
        raise
    finally:
        ticket.release()
    return answer.model_dump(mode="json", exclude={"cached", "cache"})
