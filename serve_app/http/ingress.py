"""The HTTP ingress: the deployment that serves the FastAPI app (api.py) and its routers.

A request passes the Guard (Host, control headers, API key, body size: 400, 401, 413), then
its router: the protocol model and input limits (validation, 4xx in OpenAI's error shape),
admission (the route's slot, queue and deadline; 503 or 504 in the same shape), the
deployment handle (a batched model call or a pipeline; idempotent calls made again if their
replica dies), and the response built beside its schema (JSON, or SSE framed in sse.py).
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig, overlay
from serve_app.http import api
from serve_app.http.admission import AdmissionControl
from serve_app.http.coalesce import EmbeddingCalls
from serve_app.http.guard import apply_settings, bind_host
from serve_app.http.precompute import compute_popular
from serve_app.http.replica import Handles, Replica
from serve_app.precompute.popular import Popular
from serve_app.precompute.store import PopularStore
from serve_app.store import open_store


# Room for every route's running and queued requests, so admission answers before Serve's
# own queue would.
@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api.served_app)
class Ingress:
    """Serves the app: holds the handles and settings its routers share (`Replica`, in the
    app's state), applies live settings, and computes the Precompute job's work."""

    async def __init__(
        self,
        embedder: DeploymentHandle,
        reranker: DeploymentHandle,
        generator: DeploymentHandle,
        rag_generator: DeploymentHandle | None,
        search: DeploymentHandle,
        rag: DeploymentHandle,
        documents: DeploymentHandle,
        classifier: DeploymentHandle,
        precompute: DeploymentHandle,
        config: AppConfig,
    ) -> None:
        handles = Handles(
            embedder,
            reranker,
            generator,
            search,
            rag,
            documents,
            classifier,
            precompute,
            rag_generator,
        )
        self.config = config
        settings = config.ingress.live
        # Popular queries: counted here, answered from memory when precomputed.
        store = await open_store(config.store.model_copy(update={"pool_size": 2}), "Ingress")
        models = "|".join(m.name for m in config.models().values())
        popular = Popular(
            PopularStore(store), store.url, config.precompute, models, store.timeout_s
        )
        admission = AdmissionControl(settings.admission)
        embeddings = EmbeddingCalls(embedder, settings.coalescing)
        self.replica = Replica(handles, config, settings, admission, embeddings, popular, store)
        # `api.app`, not a name imported from api: Serve copies the globals of this class.
        api.app.state.replica = self.replica  # what every route reads
        # Serve calls reconfigure only when the deployment has a user_config: apply the
        # defaults (and the keys in the environment) here, so an ingress started without one
        # is guarded like one with an empty one.
        self.bind_host = await asyncio.to_thread(bind_host)
        self.reconfigure({})
        self.precomputing = asyncio.get_running_loop().create_task(compute_popular(self.replica))

    def reconfigure(self, user_config: dict) -> None:
        """Route limits, shedding, input limits, uploads, coalescing, allowed hosts and API keys
        from the deployment's user_config, in place (a key file that cannot be read fails the
        update)."""
        settings = overlay(self.config.ingress.live, user_config)
        apply_settings(api.app.state, settings, self.bind_host)  # read by the Guard
        self.replica.admission.configure(settings.admission)
        self.replica.embeddings.configure(settings.coalescing)
        self.replica.settings = settings
