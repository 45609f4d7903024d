"""The builder's configuration and its GPU/CPU decision, without a cluster."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import deployment_options, plan
from serve_app.config import AppConfig, Batching

ROOT = Path(__file__).resolve().parents[2]


def app_args(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())["applications"][0]["args"]


def test_no_gpus_means_no_gpu_shares():
    config = plan(AppConfig(), gpus=0)
    assert {m.num_gpus for m in config.models().values()} == {0.0}
    for model in config.models().values():
        assert deployment_options(model)["ray_actor_options"]["num_gpus"] == 0.0


def test_gpus_keep_configured_shares():
    config = plan(AppConfig(), gpus=1)
    shares = {role: m.num_gpus for role, m in config.models().items()}
    assert shares == {"embedder": 0.25, "reranker": 0.25, "generator": 0.5}


def test_gpu_config_falls_back_to_cpu_without_gpus():
    config = plan(AppConfig(**app_args("configs/gpu.yaml")), gpus=0)
    assert all(m.num_gpus == 0 for m in config.models().values())
    # Only the GPU share changes; the rest of the user's settings stay.
    assert config.embedder.precision == "fp16"
    assert config.generator.max_new_tokens == 1024


def test_options_carry_cpus_and_batching():
    config = AppConfig(**app_args("serve_config.yaml"))
    options = deployment_options(config.embedder)
    assert options["name"] == "Embedder"
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert options["user_config"] == {"max_batch_size": 64, "batch_wait_timeout_s": 0.02}


def test_config_files_name_real_deployments():
    """Overrides in `deployments[]` must name deployments that build_app creates."""
    names = {deployment_options(m)["name"] for m in AppConfig().models().values()}
    for path in ("serve_config.yaml", "configs/gpu.yaml", "configs/test.yaml"):
        app = yaml.safe_load((ROOT / path).read_text())["applications"][0]
        overrides = app.get("deployments", [])
        assert {d["name"] for d in overrides} <= names
        for d in overrides:
            Batching(**d["user_config"])


def test_default_graph_fits_two_cores():
    config = AppConfig(**app_args("serve_config.yaml"))
    cpus = sum(m.num_cpus * m.num_replicas for m in config.models().values())
    for route in (config.ingress, config.search, config.rag, config.documents):
        cpus += route.num_cpus * route.num_replicas
    assert cpus <= 2.0


def test_threads_follow_cpus_unless_set():
    config = AppConfig(embedder={"num_cpus": 0.5}, generator={"num_cpus": 2, "threads": None})
    assert config.embedder.torch_threads == 1
    assert config.generator.torch_threads == 2
    assert AppConfig(reranker={"threads": 3}).reranker.torch_threads == 3


def test_cache_dir_is_absolute():
    assert AppConfig(model_cache_dir="relative/dir").model_cache_dir.is_absolute()


@pytest.mark.parametrize(
    "args",
    [
        {"embedder": {"precision": "fp8"}},
        {"generator": {"batching": {"max_batch_size": 0, "batch_wait_timeout_s": 0.01}}},
        {"reranker": {"backend": "bm25"}},
        {"embedder": {"num_gpus": -1}},
        {"embedder": {"unknown": 1}},
        {"unknown_section": {}},
    ],
)
def test_bad_args_are_rejected(args):
    with pytest.raises(ValidationError):
        AppConfig(**args)


def test_served_names():
    config = AppConfig()
    assert config.embedder.name == "all-MiniLM-L6-v2"
    assert config.generator.name == "SmolLM2-135M-Instruct"
    assert AppConfig(generator={"served_name": "chat"}).generator.name == "chat"


def test_database_url_from_environment(monkeypatch):
    assert AppConfig().store.database_url is None
    assert AppConfig().store.data_dir.is_absolute()
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/rag")
    assert AppConfig().store.database_url == "postgresql://db.example/rag"
    assert AppConfig(store={"database_url": "postgresql://other/x"}).store.database_url == (
        "postgresql://db.example/rag"
    )


def test_chunking_overlap_must_be_smaller():
    with pytest.raises(ValidationError):
        AppConfig(chunking={"max_tokens": 32, "overlap": 32})
