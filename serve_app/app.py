"""The application builder: `serve run serve_config.yaml` calls `build_app(args)`.

It validates the args into an `AppConfig`, decides GPU shares from what the cluster has, and
binds the graph: Ingress -> model deployments (Embedder, Reranker, Generator, and RAG's own
Generator unless `rag.generator` is `shared`), pipeline
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
# RAG's own Generator's Serve options beyond the generator's (serve_config.yaml cannot name a
# deployment that `rag.generator: shared` leaves out): one replica, which keeps serving the
# answers it has for the RAG route's deadline (120 s) plus a little when stopped.
RAG_GENERATOR = {"name": "RagGenerator", "graceful_shutdown_timeout_s": 125}


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


def deployment_options(model: ModelDeployment, share: float = 1.0) -> dict[str, Any]:
    """Ray Serve options of one model deployment, all taken from its config; `share` of its
    CPU and GPU shares."""
    return {
        "name": type(model).__name__.removesuffix("Config"),
        "ray_actor_options": {
            "num_cpus": model.num_cpus * share,
            "num_gpus": model.num_gpus * share,
            **({"resources": dict(model.resources)} if model.resources else {}),
        },
        "user_config": model.batching.model_dump(),
    }


def generators(config: AppConfig) -> dict[str, tuple[dict[str, Any], str]]:
    """Serve options of each Generator deployment, and what it answers (engines.ANSWERS): one
    for every route, or one for chat and RAG's own, which split the generator's CPU and GPU
    shares so that the two fit where the one did."""
    if config.rag.generator == "shared":
        return {"Generator": (deployment_options(config.generator), "all")}
    options = deployment_options(config.generator, share=0.5)
    return {
        "Generator": (options, "chat"),
        "RagGenerator": (options | RAG_GENERATOR, "rag"),
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
    bound = {
        name: Generator.options(**options).bind(config.generator, weights, answers)
        for name, (options, answers) in generators(config).items()
    }
    generator, rag_generator = bound["Generator"], bound.get("RagGenerator")
    search = Search.bind(embedder, reranker, config)
    rag = Rag.bind(embedder, reranker, rag_generator or generator, config)
    documents = Documents.bind(embedder, config)
    classify = Classify.bind(embedder, generator, config)
    precompute = Precompute.options(user_config=config.precompute.schedule.model_dump()).bind(
        config
    )
    return Ingress.bind(
        embedder,
        reranker,
        generator,
        rag_generator,
        search,
        rag,
        documents,
        classify,
        precompute,
        config,
    )
