"""The application builder: `serve run serve_config.yaml` calls `build_app(args)`.

It validates the args into an `AppConfig`, decides GPU shares from what the cluster has, and
binds the graph: Ingress -> model deployments (Embedder, Reranker, Generator), pipeline
deployments (Search, Rag, Documents, Classify), which call the models and the document store,
and the Precompute job, which decides which popular answers the Ingress computes. Every edge
of the graph is bound here: no deployment looks another up by name. The only module that
imports every layer (docs/architecture.md).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.serve import Application

from deployments.embedder import Embedder
from deployments.generator import Generator
from deployments.reranker import Reranker
from serve_app.config import AppConfig, ModelDeployment
from serve_app.http.ingress import Ingress
from serve_app.pipelines.classify import Classify
from serve_app.pipelines.documents import Documents
from serve_app.pipelines.rag import Rag
from serve_app.pipelines.search import Search
from serve_app.precompute.job import Precompute

logger = logging.getLogger("ray.serve")


def cluster_gpus() -> float:
    """GPUs the Ray cluster has (0 on a CPU-only cluster)."""
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    return float(ray.cluster_resources().get("GPU", 0.0))


def plan(config: AppConfig, gpus: float) -> AppConfig:
    """The config in effect: each model keeps its GPU share only if the cluster has GPUs.

    A replica asking for a GPU on a cluster without one would wait forever, so on such a
    cluster every share becomes 0 and the models run on CPU.
    """
    if gpus > 0:
        return config
    logger.info("No GPUs in the cluster: every model deployment runs on CPU.")
    return config.model_copy(
        update={role: m.model_copy(update={"num_gpus": 0.0}) for role, m in config.models().items()}
    )


def deployment_options(model: ModelDeployment) -> dict[str, Any]:
    """Ray Serve options of one model deployment, all taken from its config."""
    return {
        "name": type(model).__name__.removesuffix("Config"),
        "ray_actor_options": {
            "num_cpus": model.num_cpus,
            "num_gpus": model.num_gpus,
            **({"resources": dict(model.resources)} if model.resources else {}),
        },
        "user_config": model.batching.model_dump(),
    }


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate `args`, plan resources for this cluster, and bind the serving graph."""
    config = plan(AppConfig(**(args or {})), cluster_gpus())
    weights = config.model_cache_dir
    embedder = Embedder.options(**deployment_options(config.embedder)).bind(
        config.embedder, weights, config.cache
    )
    reranker = Reranker.options(**deployment_options(config.reranker)).bind(
        config.reranker, weights, config.cache
    )
    generator = Generator.options(**deployment_options(config.generator)).bind(
        config.generator, weights
    )
    search = Search.bind(embedder, reranker, config)
    rag = Rag.bind(embedder, reranker, generator, config)
    documents = Documents.bind(embedder, config)
    classify = Classify.bind(embedder, generator, config)
    precompute = Precompute.options(user_config=config.precompute.schedule.model_dump()).bind(
        config
    )
    return Ingress.bind(
        embedder, reranker, generator, search, rag, documents, classify, precompute, config
    )
