"""The models as their replicas load them (device, torch threads, precision), through the
Ray-free engine APIs in deployments/engines, for the in-process benchmark phases.

A raw phase measures the model's own limit, so nothing here has a cache.
"""

from __future__ import annotations

from pathlib import Path

from serve_app.config import EmbedderConfig, GeneratorConfig, RerankerConfig


def embedding_model(config: EmbedderConfig, cache_dir: Path):
    """The Embedder's model: `deployments.engines.embedding.EmbeddingModel`, warm."""
    from deployments.engines import embedding, loading

    device = loading.pick_device(config)
    loading.set_threads(config.torch_threads)
    return embedding.load(config.model, config.precision, device, cache_dir)


def scorer(config: RerankerConfig, cache_dir: Path):
    """The Reranker's scorer (`deployments.engines.scoring`); score with `score_pairs`."""
    from deployments.engines import loading, scoring

    device = loading.pick_device(config)
    loading.set_threads(config.torch_threads)
    loaded = scoring.load_scorer(config, cache_dir, device)
    loaded.score([("warm up", "the kernels")] * 4)
    return loaded


def score_pairs(loaded, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """(score, tokens read) per pair, in forward passes as the Reranker runs them."""
    from deployments.engines import scoring

    return scoring.score_sorted(loaded, pairs)


def generation_engine(config: GeneratorConfig, cache_dir: Path, answers: str = "all"):
    """The engine of a Generator serving `answers` (`deployments.engines.load_engine`), warm."""
    from deployments.engines import load_engine

    return load_engine(config, cache_dir, answers)[0]


def decode(engine, requests: list) -> tuple[list, list[str]]:
    """Decode `requests` (GenerationRequests) together to the end, as the Generator's loop
    does minus Serve: one prefill, then one step for all in flight. Their sequences (each
    `delta.completion_tokens` counts its tokens) and answer texts."""
    from deployments.engines.base import run_to_end

    sequences = [engine.sequence(r) for r in requests]
    texts = run_to_end(engine, sequences)
    return sequences, texts


def choose(engine, messages: list[dict[str, str]], options: list[str], max_prompt_tokens: int):
    """The Generator's constrained choice among `options` (`deployments.engines.choice`)."""
    from deployments.engines.choice import choose as engine_choose

    return engine_choose(engine, messages, options, max_prompt_tokens)
