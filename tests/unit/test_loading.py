"""Model resolution and precision choice, without loading weights."""

from deployments import loading
from serve_app.config import DEFAULT_EMBEDDING_MODEL


def test_unknown_models_pass_through_unchanged(tmp_path):
    assert loading.causal_lm_path("some-org/some-model", tmp_path) == "some-org/some-model"
    assert loading.local_path("/models/mine") == "/models/mine"
    assert loading.local_path(DEFAULT_EMBEDDING_MODEL).endswith("model")


def test_precision_auto_follows_the_device():
    assert loading.resolve_precision("auto", "cuda") == "fp16"
    cpu = loading.resolve_precision("auto", "cpu")
    assert cpu == ("bf16" if loading.cpu_supports_bf16() else "fp32")
    assert loading.resolve_precision("fp32", "cuda") == "fp32"
