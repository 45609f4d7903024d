"""What the routers of one ingress replica share, and the dependency that hands it to them.

The `Ingress` deployment builds one `Replica` in its constructor and keeps it in the served
app's `state`, where the Guard also reads its settings; a route asks for it with
`replica: Replica = Depends(replica)`, or `ReplicaDep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig, IngressLive
from serve_app.http.admission import AdmissionControl
from serve_app.http.coalesce import EmbeddingCalls
from serve_app.precompute.popular import Popular
from serve_app.protocol import errors
from serve_app.store.vector_store import VectorStore


@dataclass(frozen=True)
class Handles:
    """The deployments the routes call."""

    embedder: DeploymentHandle
    reranker: DeploymentHandle
    generator: DeploymentHandle
    search: DeploymentHandle
    rag: DeploymentHandle
    documents: DeploymentHandle
    classifier: DeploymentHandle
    precompute: DeploymentHandle
    rag_generator: DeploymentHandle | None = None  # RAG's own Generator (`rag.generator: own`)

    def models(self) -> dict[str, DeploymentHandle]:
        """The model deployments by role, as /ready and /v1/status report them."""
        models = {"embedder": self.embedder, "reranker": self.reranker, "generator": self.generator}
        if self.rag_generator is not None:
            models["rag_generator"] = self.rag_generator
        return models


@dataclass
class Replica:
    """Handles, the config, the live settings (replaced on every reconfigure), admission,
    the coalesced embedding calls, the popular-query state and the store pool of one ingress
    replica."""

    handles: Handles
    config: AppConfig
    settings: IngressLive
    admission: AdmissionControl
    embeddings: EmbeddingCalls  # /v1/embeddings' calls to the Embedder, coalesced
    popular: Popular
    store: VectorStore  # /ready's `SELECT 1`

    def served_name(self, role: str, requested: str | None) -> str:
        """The name of the model serving `role`; 404 when a request names another one."""
        name = self.config.models()[role].name
        if requested is not None and requested != name:
            raise errors.APIError(
                404,
                f"The model '{requested}' does not exist; this route serves '{name}'.",
                param="model",
                code="model_not_found",
            )
        return name


def replica(request: Request) -> Replica:
    return request.app.state.replica


ReplicaDep = Annotated[Replica, Depends(replica)]
