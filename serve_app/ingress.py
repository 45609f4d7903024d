"""The HTTP ingress: thin routes that validate, call a model deployment's handle, shape the answer.

Guard (API key, body size: 401, 413) -> route -> protocol model and input limits (validation,
4xx in OpenAI's error shape) -> admission (the route's slot, queue and deadline; 503 or 504 in
the same shape) -> deployment handle (batched model call; idempotent calls made again if their
replica dies) -> protocol response.
"""

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
import orjson
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.admission import AdmissionControl, Ticket, all_within
from serve_app.cascade import decision
from serve_app.config import AppConfig, overlay
from serve_app.contracts import Delta, Generated, GenerationRequest, Sources, ranked
from serve_app.guard import Guard, apply_settings, bind_host
from serve_app.metrics import chat_ttft_ms
from serve_app.popular import Popular
from serve_app.protocol import errors, limits
from serve_app.protocol.classify import ClassifyRequest, ClassifyResponse
from serve_app.protocol.documents import (
    COLLECTION_PATTERN,
    CollectionInfo,
    CollectionList,
    Deleted,
    IngestRequest,
    IngestResponse,
    RagRequest,
    RagResponse,
    RagUsage,
    SearchRequest,
    SearchResponse,
    Timings,
)
from serve_app.protocol.openai import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    DeltaMessage,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)
from serve_app.protocol.rerank import (
    Document,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from serve_app.store import open_store
from serve_app.store.popular import Answer, PopularStore

app = FastAPI(
    title="rag-serve",
    summary="Embedding, reranking and chat behind OpenAI-compatible routes, on Ray Serve.",
    version="0.1.0",
)
errors.install(app)
app.add_middleware(Guard)


def _usage(delta: Delta) -> Usage:
    return Usage(
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        total_tokens=delta.prompt_tokens + delta.completion_tokens,
        truncated_prompt_tokens=delta.truncated_prompt_tokens,
    )


async def _sse_chunks(
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
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

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
        yield errors.sse_error(exc)
        yield "data: [DONE]\n\n"
        return
    yield event([ChunkChoice(delta=DeltaMessage(), finish_reason=last.finish_reason)])
    if include_usage:
        yield event([], usage=_usage(last))
    yield "data: [DONE]\n\n"


async def _join(first: Delta, rest: AsyncIterator[Delta]) -> tuple[str, Delta]:
    """The whole text of a generation, and its last delta."""
    text, last = first.text, first
    async for delta in rest:
        text, last = text + delta.text, delta
    return text, last


async def _rag_events(sources: Sources, rest: AsyncIterator) -> AsyncIterator[str]:
    """SSE: `{"type": "delta", "text"}` events, then one `{"type": "done", citations, ...}`."""
    last: Delta | None = None
    try:
        async for event in rest:
            if isinstance(event, Delta):
                last = event
                if event.text:
                    yield f"data: {json.dumps({'type': 'delta', 'text': event.text})}\n\n"
            elif isinstance(event, Generated) and last is not None:
                done = {
                    "type": "done",
                    "finish_reason": last.finish_reason,
                    "citations": [c.model_dump() for c in sources.citations],
                    "usage": _usage(last).model_dump(),
                    "timings": {**sources.timings, "generate_ms": event.generate_ms},
                }
                yield f"data: {json.dumps(done)}\n\n"
    except Exception as exc:  # the status line is gone: report in-band
        yield errors.sse_error(exc)
    yield "data: [DONE]\n\n"


async def _rag_answer(sources: Sources, events: AsyncIterator) -> RagResponse:
    """The whole answer: the generator's text joined, with its citations and timings."""
    text, last, generated = "", None, None
    async for event in events:
        if isinstance(event, Delta):
            text, last = text + event.text, event
        elif isinstance(event, Generated):
            generated = event
    assert last is not None and generated is not None
    return RagResponse(
        answer=text,
        finish_reason=last.finish_reason,
        citations=sources.citations,
        usage=RagUsage(**_usage(last).model_dump()),
        timings=Timings(**sources.timings, generate_ms=generated.generate_ms),
    )


def _precomputed(answer: Answer, stream: bool = False) -> Response:
    """A precomputed answer as JSON, or for a streamed RAG request as its SSE events, saying
    where it came from and its age (also the `Age` header)."""
    age = answer.age_s
    cache = {"cached": True, "cache": {"source": "precomputed", "age_s": round(age, 3)}}
    headers = {"Age": str(int(age))}
    if not stream:
        body = orjson.dumps({**answer.body, **cache})
        return Response(body, media_type="application/json", headers=headers)
    body = answer.body
    done = {
        "type": "done",
        **{k: body[k] for k in ("finish_reason", "citations", "usage", "timings")},
        **cache,
    }
    events = [{"type": "delta", "text": body["answer"]}, done] if body["answer"] else [done]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return Response(sse, media_type="text/event-stream", headers=headers)


def _deployment_states() -> dict[str, dict]:
    """Status and replicas by state of each deployment of this application (Serve's status)."""
    app_name = serve.get_replica_context().app_name
    deployments = serve.status().applications[app_name].deployments
    return {
        name: {
            "status": str(d.status.value),
            "replicas": {str(state): n for state, n in d.replica_states.items()},
        }
        for name, d in deployments.items()
    }


# Room for every route's running and queued requests, so admission answers before Serve's
# own queue would.
@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    """Composes the model deployments behind one FastAPI app."""

    async def __init__(
        self,
        embedder: DeploymentHandle,
        reranker: DeploymentHandle,
        generator: DeploymentHandle,
        search: DeploymentHandle,
        rag: DeploymentHandle,
        documents: DeploymentHandle,
        classifier: DeploymentHandle,
        precompute: DeploymentHandle,
        config: AppConfig,
    ) -> None:
        self.embedder = embedder
        self.reranker = reranker
        self.generator = generator
        self.search_route = search
        self.rag = rag
        self.documents = documents
        self.classifier = classifier
        self.precompute = precompute
        self.config = config
        self.handles = {"embedder": embedder, "reranker": reranker, "generator": generator}
        self.settings = config.ingress.live
        self.admission = AdmissionControl(self.settings.admission)
        # Serve calls reconfigure only when the deployment has a user_config: apply the
        # defaults (and the keys in the environment) here, so an ingress started without one
        # is guarded like one with an empty one.
        self.bind_host = await asyncio.to_thread(bind_host)
        self.reconfigure({})
        # Popular queries: counted here, answered from memory when precomputed.
        store = await open_store(config.store.model_copy(update={"pool_size": 2}), "Ingress")
        models = "|".join(m.name for m in config.models().values())
        self.popular = Popular(
            PopularStore(store), store.url, config.precompute, models, store.timeout_s
        )
        self.store = store  # /ready's `SELECT 1`

    def reconfigure(self, user_config: dict) -> None:
        """Route limits, shedding, input limits, uploads, allowed hosts and API keys from the
        deployment's user_config, in place (a key file that cannot be read fails the update)."""
        settings = overlay(self.config.ingress.live, user_config)
        apply_settings(app.state, settings, self.bind_host)  # read by the Guard
        self.admission.configure(settings.admission)
        self.settings = settings

    # --- health -----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": errors.ErrorResponse}})
    async def ready(self):
        """200 once every model has loaded and the document store answers `SELECT 1`, 503
        until then. Cheap, as probes call it often: no query touches the documents, and the
        calls are cancelled when it gives up."""
        roles = list(self.handles)
        calls = [self.handles[role].model_info.remote() for role in roles]
        try:
            *answers, _ = await all_within(
                self.config.ingress.ready_timeout_s, calls, self._select_one()
            )
            infos = dict(zip(roles, answers, strict=True))
        except Exception:
            return errors.error_response(
                errors.APIError(
                    503,
                    "Models or the document store are not ready yet.",
                    "unavailable",
                    code="not_ready",
                )
            )
        return {"status": "ready", "models": {role: i["model"] for role, i in infos.items()}}

    async def _select_one(self) -> None:
        async with self.store.connection() as conn:
            await conn.execute("SELECT 1")

    @app.get("/v1/status")
    async def status(self) -> dict[str, object]:
        """Routes with limits and load, host pressure, replicas per deployment, and models."""
        async with self.admission.admit("manage") as ticket:
            schedule = ticket.track(self.precompute.report.remote())
            deployments, models, schedule = await ticket.wait(
                asyncio.gather(
                    asyncio.to_thread(_deployment_states), self._model_infos(ticket), schedule
                )
            )
        return {
            **self.admission.report(),
            "inputs": self.settings.inputs.model_dump(),
            "auth": {"keys": len(app.state.api_keys.digests)},  # how many, never which
            "classify": decision(self.config).status(),  # threshold in effect and its source
            "precompute": {**self.popular.report(), "schedule": schedule},
            "deployments": deployments,
            "models": models,
        }

    async def _model_infos(self, ticket: Ticket) -> dict[str, dict]:
        roles = list(self.handles)
        calls = [ticket.track(self.handles[r].model_info.remote()) for r in roles]
        return dict(zip(roles, await asyncio.gather(*calls), strict=True))

    # --- models -----------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=m.name) for m in self.config.models().values()])

    def _served_name(self, role: str, requested: str | None) -> str:
        name = self.config.models()[role].name
        if requested is not None and requested != name:
            raise errors.APIError(
                404,
                f"The model '{requested}' does not exist; this route serves '{name}'.",
                param="model",
                code="model_not_found",
            )
        return name

    # --- embeddings -------------------------------------------------------------------------
    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(self, request: EmbeddingRequest) -> Response:
        model = self._served_name("embedder", request.model)
        limits.check_embeddings(request, self.settings.inputs)
        async with self.admission.admit("embeddings") as ticket:
            result = await ticket.call(lambda: self.embedder.embed.remote(request.texts), request)
        vectors = result.vectors
        if request.dimensions is not None:
            if request.dimensions > vectors.shape[1]:
                raise errors.APIError(
                    400,
                    f"dimensions must be at most {vectors.shape[1]} for {model}.",
                    param="dimensions",
                    code="invalid_value",
                )
            vectors = vectors[:, : request.dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        if request.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = list(vectors)  # float32 rows, written by orjson without a Python float each
        tokens = sum(result.tokens)
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
            ],
            "model": model,
            # truncated_inputs: inputs longer than the model reads, cut at its maximum.
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "truncated_inputs": result.truncated,
            },
        }
        # The EmbeddingResponse shape, serialized by orjson straight from float32 rows: through
        # pydantic and json.dumps, thousands of floats per answer cost more than the hop itself.
        return Response(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    # --- rerank -----------------------------------------------------------------------------
    @app.post("/v1/rerank")
    @app.post("/rerank", include_in_schema=False)
    async def rerank(self, request: RerankRequest) -> RerankResponse:
        model = self._served_name("reranker", request.model)
        limits.check_rerank(request, self.settings.inputs)
        texts = request.texts
        async with self.admission.admit("rerank") as ticket:
            scored = await ticket.call(
                lambda: self.reranker.rerank.remote(request.query, texts), request
            )
        results = [
            RerankResult(
                index=i,
                relevance_score=scored[i].score,
                document=Document(text=texts[i]) if request.return_documents else None,
            )
            for i in ranked(scored, request.top_n)
        ]
        usage = RerankUsage(
            total_tokens=sum(s.tokens for s in scored),
            truncated_documents=sum(s.cut for s in scored),
        )
        return RerankResponse(id=new_id("rerank"), model=model, results=results, usage=usage)

    # --- chat -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(self, request: ChatCompletionRequest):
        arrived = time.perf_counter()
        model = self._served_name("generator", request.model)
        limits.check_chat(request, self.settings.inputs)
        cap = self.config.generator.max_new_tokens
        budget = request.token_budget or cap
        if budget > cap:
            raise errors.APIError(
                400, f"max_tokens must be at most {cap}.", param="max_tokens", code="invalid_value"
            )
        temperature = request.temperature
        generation = GenerationRequest(
            messages=[{"role": m.role, "content": m.text()} for m in request.messages],
            max_tokens=budget,
            temperature=self.config.generator.default_temperature
            if temperature is None
            else temperature,
            top_p=request.top_p,
            stop=request.stops,
            seed=request.seed,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
        )
        async with self.admission.admit("chat") as ticket:
            deltas = ticket.track(self.generator.options(stream=True).generate.remote(generation))
            # Wait for the first token before answering: overload or failure still gets a status.
            first = await ticket.wait(anext(deltas))
            chat_ttft_ms().observe((time.perf_counter() - arrived) * 1000)
            completion_id, created = new_id("chatcmpl"), int(time.time())
            if request.stream:
                usage = bool(request.stream_options and request.stream_options.include_usage)
                events = _sse_chunks(first, deltas, completion_id, created, model, usage)
                return StreamingResponse(ticket.stream(events), media_type="text/event-stream")
            text, last = await ticket.wait(_join(first, deltas))
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=model,
            choices=[
                Choice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)
            ],
            usage=_usage(last),
        )

    # --- classification ---------------------------------------------------------------------
    @app.post("/v1/classify")
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """A label per input: embedding similarity, and the generator where that is unsure."""
        limits.check_classify(request, self.settings.inputs, self.config.classify.max_labels)
        async with self.admission.admit("classify") as ticket:
            return await ticket.call(lambda: self.classifier.classify.remote(request), request)

    # --- documents --------------------------------------------------------------------------
    @app.post("/v1/documents")
    async def ingest(self, request: IngestRequest) -> IngestResponse:
        """Chunk, embed and store documents; an id already stored is replaced atomically."""
        limits.check_ingest(request, self.settings.inputs)
        async with self.admission.admit("ingest") as ticket:
            # Idempotent: a document's id (or its text's hash) names it, and each request is
            # stored in one transaction, so a second try replaces what the first left, if any.
            try:
                max_chunks = self.settings.inputs.max_chunks
                return await ticket.call(
                    lambda: self.documents.ingest.remote(request, max_chunks), request
                )
            finally:  # even a failed ingest may have committed
                self.popular.answers.forget(request.collection)

    @app.delete("/v1/documents/{collection}/{document_id:path}")
    async def delete_document(
        self,
        collection: Annotated[str, PathParam(pattern=COLLECTION_PATTERN)],
        document_id: Annotated[str, PathParam(min_length=1, max_length=256, pattern=r"^[^\x00]+$")],
    ) -> Deleted:
        async with self.admission.admit("manage") as ticket:
            deleted = await ticket.result(
                self.documents.delete_document.remote(collection, document_id)
            )
        if not deleted:  # nothing changed: the collection's answers stay valid
            raise errors.APIError(
                404,
                f"No document '{document_id}' in '{collection}'.",
                "not_found_error",
                param="document_id",
                code="document_not_found",
            )
        self.popular.answers.forget(collection)
        return Deleted(id=document_id, object="document")

    @app.get("/v1/collections")
    async def collections(self) -> CollectionList:
        async with self.admission.admit("manage") as ticket:
            rows = await ticket.result(self.documents.collections.remote())
        return CollectionList(data=[CollectionInfo(**row) for row in rows])

    @app.delete("/v1/collections/{name}")
    async def delete_collection(
        self, name: Annotated[str, PathParam(pattern=COLLECTION_PATTERN)]
    ) -> Deleted:
        async with self.admission.admit("manage") as ticket:
            await ticket.result(self.documents.delete_collection.remote(name))
        self.popular.answers.forget(name)
        return Deleted(id=name, object="collection")

    # --- search and answers -----------------------------------------------------------------
    @app.post("/v1/search", response_model=SearchResponse)
    async def search(self, request: SearchRequest):
        """Nearest chunks by cosine (HNSW), metadata filters, optional rerank."""
        limits.check_retrieval(request, self.settings.inputs)
        asked = self.popular.ask("search", request)
        if (answer := self.popular.lookup(asked)) is not None:
            return _precomputed(answer)  # no model runs: no slot taken
        async with self.admission.admit("search") as ticket:
            self.popular.count(asked)  # only what was answered or admitted: a 503 is not asked
            return await ticket.call(lambda: self.search_route.search.remote(request), request)

    @app.post("/v1/rag/query", response_model=RagResponse)
    async def rag_query(self, request: RagRequest):
        """Retrieve, rerank, and answer citing sources by number; SSE with `stream`."""
        request = self._rag_request(request)
        asked = self.popular.ask("rag", request)
        if (answer := self.popular.lookup(asked)) is not None:
            return _precomputed(answer, request.stream)
        async with self.admission.admit("rag") as ticket:
            self.popular.count(asked)
            events = ticket.track(self.rag.options(stream=True).answer.remote(request))
            sources: Sources = await ticket.wait(anext(events))  # retrieval errors: a status
            if request.stream:
                stream = ticket.stream(_rag_events(sources, events))
                return StreamingResponse(stream, media_type="text/event-stream")
            return await ticket.wait(_rag_answer(sources, events))

    def _rag_request(self, request: RagRequest) -> RagRequest:
        """The request checked against the input limits, with its max_tokens default filled."""
        limits.check_retrieval(request, self.settings.inputs)
        cap = self.config.generator.max_new_tokens
        if request.max_tokens is not None and request.max_tokens > cap:
            raise errors.APIError(
                400, f"max_tokens must be at most {cap}.", param="max_tokens", code="invalid_value"
            )
        return request.model_copy(update={"max_tokens": request.max_tokens or min(256, cap)})

    # --- background work --------------------------------------------------------------------
    async def run_background(self, kind: str, request: dict) -> dict | None:
        """Run a counted search or RAG request for the Precompute job, at background priority
        (admission.background): its answer without cache fields, or None where the route had
        no free slot or a client took it."""
        if kind == "search":
            parsed = SearchRequest(**request)
        else:
            parsed = self._rag_request(RagRequest(**{**request, "stream": False}))
        ticket = self.admission.background(kind)  # the routes are named as the kinds
        if ticket is None:
            return None
        try:
            if kind == "search":
                answer = await ticket.result(self.search_route.search.remote(parsed))
            else:
                events = ticket.track(self.rag.options(stream=True).answer.remote(parsed))
                answer = await ticket.wait(_rag_answer(await ticket.wait(anext(events)), events))
        except Exception:
            if ticket.preempted:
                return None
            raise
        finally:
            ticket.release()
        return answer.model_dump(mode="json", exclude={"cached", "cache"})
