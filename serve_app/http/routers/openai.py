"""OpenAI's routes: the model list, embeddings and chat completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from serve_app.contracts import Delta, GenerationRequest
from serve_app.http import sse
from serve_app.http.replica import Replica, ReplicaDep
from serve_app.metrics import chat_tpot_ms, chat_ttft_ms, generated_tokens
from serve_app.protocol import limits
from serve_app.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    new_id,
)

router = APIRouter()


@router.get("/v1/models")
async def models(replica: ReplicaDep) -> ModelList:
    return ModelList(data=[ModelCard(id=m.name) for m in replica.config.models().values()])


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(request: EmbeddingRequest, replica: ReplicaDep) -> Response:
    model = replica.served_name("embedder", request.model)
    limits.check_embeddings(request, replica.settings.inputs)
    embeddings = replica.embeddings
    async with replica.admission.admit("embeddings") as ticket:
        result = await ticket.call(lambda: embeddings.embed(request.texts), request)
    limits.check_dimensions(request.dimensions, result.vectors.shape[1], model)
    body = EmbeddingResponse.body(result, request, model)
    return Response(body, media_type="application/json")


def generation(request: ChatCompletionRequest, replica: Replica) -> GenerationRequest:
    """What the generator is asked: the conversation, and the sampling asked for, with the
    configured temperature where none is."""
    generator = replica.config.generator
    budget = request.token_budget or generator.max_new_tokens
    limits.check_max_tokens(budget, generator.max_new_tokens)
    temperature = request.temperature
    return GenerationRequest(
        messages=[{"role": m.role, "content": m.text()} for m in request.messages],
        max_tokens=budget,
        temperature=generator.default_temperature if temperature is None else temperature,
        top_p=request.top_p,
        stop=request.stops,
        seed=request.seed,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
    )


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat(request: ChatCompletionRequest, replica: ReplicaDep):
    arrived = time.perf_counter()
    model = replica.served_name("generator", request.model)
    limits.check_chat(request, replica.settings.inputs)
    asked = generation(request, replica)
    generator = replica.handles.generator
    async with replica.admission.admit("chat") as ticket:
        deltas = ticket.track(generator.options(stream=True).generate.remote(asked))
        # Wait for the first token before answering: overload or failure still gets a status.
        first = await ticket.wait(anext(deltas))
        first_at = time.perf_counter()
        chat_ttft_ms().observe((first_at - arrived) * 1000)
        rest = measured(first, first_at, deltas)
        completion_id, created = new_id("chatcmpl"), int(time.time())
        if request.stream:
            usage = bool(request.stream_options and request.stream_options.include_usage)
            events = sse.chat_chunks(first, rest, completion_id, created, model, usage)
            return StreamingResponse(ticket.stream(events), media_type="text/event-stream")
        text, last = await ticket.wait(join(first, rest))
    return ChatCompletion.of(completion_id, created, model, text, last)


async def measured(
    first: Delta, first_at: float, rest: AsyncIterator[Delta]
) -> AsyncIterator[Delta]:
    """`rest` as it comes; once it ends, the completion's time per output token after the
    first (`first_at`, when the first arrived) and its tokens into the metrics."""
    last = first
    async for delta in rest:
        last = delta
        yield delta
    after_first = last.completion_tokens - first.completion_tokens
    if after_first > 0:
        chat_tpot_ms().observe((time.perf_counter() - first_at) * 1000 / after_first)
    if last.completion_tokens:
        generated_tokens().inc(last.completion_tokens, tags={"route": "chat"})


async def join(first: Delta, rest: AsyncIterator[Delta]) -> tuple[str, Delta]:
    """The whole text of a generation, and its last delta."""
    text, last = first.text, first
    async for delta in rest:
        text, last = text + delta.text, delta
    return text, last
