"""Model-level behaviour with the real bundled weights, in process (no Ray)."""

import threading
import time

import pytest

from deployments.engines import loading
from deployments.reranker import Reranker
from serve_app.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_GENERATION_MODEL, AppConfig

pytestmark = pytest.mark.integration


def test_gguf_conversion_is_done_once_and_safe_concurrently(tmp_path):
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                loading.causal_lm_path(DEFAULT_GENERATION_MODEL, tmp_path)
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    folder = tmp_path / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert results[0] == str(folder)
    assert (folder / "model.safetensors").exists()
    assert not [
        p
        for p in tmp_path.iterdir()
        if p.name.startswith(folder.name + ".") and p.suffix != ".lock"
    ]  # no temporary folder left behind
    written = (folder / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    assert loading.causal_lm_path(DEFAULT_GENERATION_MODEL, tmp_path) == str(folder)
    assert time.perf_counter() - start < 1.0
    assert (folder / "model.safetensors").stat().st_mtime == written


def test_cross_encoder_backend_scores_pairs():
    # No trained cross-encoder ships offline: MiniLM with a fresh head exercises the code path.
    config = AppConfig(
        reranker={"backend": "cross-encoder", "model": DEFAULT_EMBEDDING_MODEL, "precision": "fp32"}
    )
    reranker = Reranker.func_or_class(config.reranker, config.model_cache_dir, config.cache)
    pairs = [("query", "a passage"), ("query", "another, longer passage about something")]
    scored = reranker._score_sorted(pairs)
    assert len(scored) == 2
    assert all(isinstance(s, float) and tokens > 2 for s, tokens in scored)
    assert reranker.model_info()["backend"] == "cross-encoder"
