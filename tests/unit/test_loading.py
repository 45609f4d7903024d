"""Model resolution, without loading weights."""

from deployments.engines import loading
from serve_app.config import DEFAULT_EMBEDDING_MODEL


def test_unknown_models_pass_through_unchanged(tmp_path):
    assert loading.causal_lm_path("some-org/some-model", tmp_path) == "some-org/some-model"
    assert loading.local_path("/models/mine") == "/models/mine"
    assert loading.local_path(DEFAULT_EMBEDDING_MODEL).endswith("model")
