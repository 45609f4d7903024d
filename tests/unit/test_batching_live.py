"""Model deployments' live batch settings: the user_config laid over the args' defaults, in
`__init__` as in `reconfigure`; and the arithmetic that splits a batch's results back."""

from __future__ import annotations

import pytest

from deployments.batching import BatchedModel
from deployments.embedder import Embedder
from deployments.engines.batching import BatchStats, Piece, unflatten
from deployments.generator import Generator
from deployments.reranker import Reranker
from serve_app.config import Batching, EmbedderConfig, GeneratorConfig, RerankerConfig

MODELS = [
    (Embedder, EmbedderConfig, ("_embed_batch", "_bulk_batch")),
    (Reranker, RerankerConfig, ("_score_batch",)),
    (Generator, GeneratorConfig, ("_generate_batch",)),
]


def replica(deployment, defaults: Batching) -> BatchedModel:
    """The deployment's batching side alone: no model, no Serve."""
    model = object.__new__(deployment.func_or_class)
    BatchedModel.__init__(model, defaults)
    return model


@pytest.mark.parametrize(("deployment", "config", "methods"), MODELS)
def test_without_a_user_config_the_args_defaults_apply(deployment, config, methods):
    defaults = config().batching
    model = replica(deployment, defaults)
    assert (model.max_batch_size, model.max_batch_tokens) == (
        defaults.max_batch_size,
        defaults.max_batch_tokens,
    )
    for name in methods:
        method = getattr(model, name)
        assert method._get_max_batch_size() == defaults.max_batch_size
        assert method._get_batch_wait_timeout_s() == defaults.batch_wait_timeout_s
    assert model.info["batching"] == defaults.model_dump()


@pytest.mark.parametrize(("deployment", "config", "methods"), MODELS)
def test_an_omitted_field_keeps_the_models_own_default(deployment, config, methods):
    defaults = config().batching
    model = replica(deployment, defaults)
    model.apply_batching({"max_batch_size": 3})  # what each reconfigure applies
    assert model.max_batch_size == 3
    assert model.max_batch_tokens == defaults.max_batch_tokens  # not Batching's 8,192
    for name in methods:
        assert getattr(model, name)._get_max_batch_size() == 3
        assert getattr(model, name)._get_batch_wait_timeout_s() == defaults.batch_wait_timeout_s
    # Each reconfigure starts again from the args: nothing of an earlier user_config stays.
    model.apply_batching({"batch_wait_timeout_s": 0.5})
    assert (model.max_batch_size, model.max_batch_tokens) == (
        defaults.max_batch_size,
        defaults.max_batch_tokens,
    )


def test_the_args_defaults_are_the_deployments_own():
    args = GeneratorConfig(
        batching={"max_batch_size": 2, "max_batch_tokens": 4096, "batch_wait_timeout_s": 0.0}
    )
    model = replica(Generator, args.batching)
    model.reconfigure({"max_batch_size": 5})
    assert (model.max_batch_size, model.max_batch_tokens) == (5, 4096)


@pytest.mark.parametrize("deployment", [Reranker, Generator])
def test_a_model_or_precision_switch_needs_a_restart_outside_the_embedder(deployment):
    model = replica(deployment, GeneratorConfig().batching)
    with pytest.raises(ValueError, match="restarts"):
        model.reconfigure({"precision": "bf16"})


def test_pieces_use_the_live_token_bound():
    model = replica(Reranker, RerankerConfig().batching)
    model.reconfigure({"max_batch_size": 4, "max_batch_tokens": 100})
    pieces = model.pieces(list("abcdef"), [40, 40, 40, 10, 10, 100])
    assert [list(p.items) for p in pieces] == [["a", "b"], ["c", "d", "e"], ["f"]]


def test_unflatten_hands_each_request_its_own_results_in_order():
    requests = [Piece(["a", "b"], [1, 1], 2), Piece([], [], 1), Piece(["c"], [1], 1)]
    assert unflatten([1, 2, 3], requests) == [[1, 2], [], [3]]


def test_batch_stats_count_what_ran():
    stats = BatchStats()
    stats.record(requests=2, items=10, tokens=300)
    stats.record(requests=1, items=4, tokens=900)
    snapshot = stats.snapshot()
    assert snapshot["batches"] == 2 and snapshot["items"] == 14 and snapshot["requests"] == 3
    assert snapshot["max_items"] == 10 and snapshot["max_tokens"] == 900
    assert snapshot["mean_items"] == 7.0 and snapshot["mean_requests"] == 1.5
