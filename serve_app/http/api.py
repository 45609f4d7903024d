"""The FastAPI app: the error handlers, the Guard, and one router per area.

The `Ingress` deployment serves this very object (`served_app`, called on the replica), and
writes its settings and shared state into `app.state`, where the Guard and the routes read
them. A FastAPI instance handed to `serve.ingress` would be served as a copy, apart from the
state the deployment writes; a function is not copied.
"""

from __future__ import annotations

from fastapi import FastAPI

from serve_app.http.guard import Guard
from serve_app.http.routers import classify, documents, openai, operations, rerank, retrieval
from serve_app.protocol import errors

app = FastAPI(
    title="rag-serve",
    summary="Embedding, reranking and chat behind OpenAI-compatible routes, on Ray Serve.",
    version="0.1.0",
)
errors.install(app)
app.add_middleware(Guard)
app.include_router(operations.router)
app.include_router(openai.router)
app.include_router(rerank.router)
app.include_router(classify.router)
app.include_router(documents.router)
app.include_router(retrieval.router)


def served_app() -> FastAPI:
    """The app an ingress replica serves (Serve calls it once the deployment is built)."""
    return app
