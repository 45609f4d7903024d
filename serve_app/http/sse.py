"""Server-sent events: every `data:` line the API streams is framed here.

Two streams: OpenAI's chat completion chunks, and the RAG answer's `delta` and `done` events
(protocol/documents.py). Both end with `data: [DONE]`. A failure after the status line went
out is reported in-band as an error event in the one error shape, then the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from serve_app.contracts import Delta, Generated, Sources
from serve_app.protocol.documents import CacheInfo, RagDelta, RagDone
from serve_app.protocol.errors import (
    REPLICA_FAILURES,
    APIError,
    ErrorResponse,
    replica_failed,
)
from serve_app.protocol.openai import ChatCompletionChunk, ChunkChoice, DeltaMessage, Usage

DONE = "data: [DONE]\n\n"


def frame(data: str) -> str:
    return f"data: {data}\n\n"


def model_event(model: BaseModel, exclude_none: bool = False) -> str:
    """A pydantic model as one event, written by pydantic (the chat chunks, errors)."""
    return frame(model.model_dump_json(exclude_none=exclude_none))


def json_event(model: BaseModel) -> str:
    """A RAG event, written by json.dumps without its null fields."""
    return frame(json.dumps(model.model_dump(mode="json", exclude_none=True)))


def error_event(error: APIError) -> str:
    """`error` as an event of a stream whose status line has already gone out."""
    return model_event(ErrorResponse(error=error.body))


def failure_event(exc: BaseException) -> str:
    """An error event for a failure in the middle of a stream."""
    if isinstance(exc, APIError):
        return error_event(exc)
    if isinstance(exc, REPLICA_FAILURES):
        return error_event(replica_failed())
    return error_event(APIError(500, f"Generation failed: {type(exc).__name__}", "api_error"))


async def chat_chunks(
    first: Delta,
    rest: AsyncIterator[Delta],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks, a finish chunk, usage if asked, [DONE]."""

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=completion_id, created=created, model=model, choices=choices, usage=usage
        )
        return model_event(chunk, exclude_none=True)

    yield event([ChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
    last = first
    try:
        delta: Delta | None = first
        while delta is not None:
            last = delta
            if delta.text:
                yield event([ChunkChoice(delta=DeltaMessage(content=delta.text))])
            delta = await anext(rest, None)
    except Exception as exc:  # the status line is gone: report in-band, then end the stream
        yield failure_event(exc)
        yield DONE
        return
    yield event([ChunkChoice(delta=DeltaMessage(), finish_reason=last.finish_reason)])
    if include_usage:
        yield event([], usage=Usage.of(last))
    yield DONE


async def rag_events(sources: Sources, rest: AsyncIterator) -> AsyncIterator[str]:
    """The RAG stream: a `delta` event per piece of text, then one `done` event."""
    last: Delta | None = None
    try:
        async for event in rest:
            if isinstance(event, Delta):
                last = event
                if event.text:
                    yield json_event(RagDelta(text=event.text))
            elif isinstance(event, Generated) and last is not None:
                yield json_event(RagDone.of(sources, last, event))
    except Exception as exc:  # the status line is gone: report in-band
        yield failure_event(exc)
    yield DONE


def precomputed_rag(answer: dict[str, Any], cache: CacheInfo) -> str:
    """A stored RAG answer as the stream it would have been: its text in one `delta` event
    (none if empty), the `done` event saying where it came from, and [DONE]."""
    done = json_event(RagDone.precomputed(answer, cache))
    text = answer["answer"]
    return (json_event(RagDelta(text=text)) if text else "") + done + DONE
