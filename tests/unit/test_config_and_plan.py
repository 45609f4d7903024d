"""The builder's configuration and its GPU/CPU decision, without a cluster."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import deployment_options, generators, plan
from serve_app.config import (
    Admission,
    AppConfig,
    Batching,
    IngressLive,
    PrecomputeLive,
    RagConfig,
    overlay,
)
from serve_app.http.ingress import Ingress
from serve_app.pipelines.classify import Classify
from serve_app.pipelines.documents import Documents
from serve_app.pipelines.rag import Rag
from serve_app.pipelines.search import Search
from serve_app.precompute.job import Precompute

ROOT = Path(__file__).resolve().parents[2]
ROUTE_DEPLOYMENTS = {
    "Ingress": Ingress,
    "Search": Search,
    "Rag": Rag,
    "Documents": Documents,
    "Classify": Classify,
    "Precompute": Precompute,
}


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


def test_rag_gets_its_own_generator_in_the_shares_of_the_one():
    """`own` (the default): two Generators, chat's and RAG's, each weighing its own answers in
    `engine: auto` and each with half the generator's shares; `shared`: the one, whole."""
    config = AppConfig(generator={"num_cpus": 0.4, "num_gpus": 0.5})
    split = generators(config)
    assert {name: answers for name, (_, answers) in split.items()} == {
        "Generator": "chat",
        "RagGenerator": "rag",
    }
    for options, _ in split.values():
        assert options["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 0.25}
        assert options["user_config"] == config.generator.batching.model_dump()
    assert split["RagGenerator"][0]["graceful_shutdown_timeout_s"] >= 120  # RAG's deadline
    [(options, answers)] = generators(
        config.model_copy(update={"rag": RagConfig(generator="shared")})
    ).values()
    assert answers == "all" and options["name"] == "Generator"
    assert options["ray_actor_options"] == {"num_cpus": 0.4, "num_gpus": 0.5}


def test_options_carry_cpus_and_batching():
    config = AppConfig(**app_args("serve_config.yaml"))
    options = deployment_options(config.embedder)
    assert options["name"] == "Embedder"
    assert options["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 0.25}
    assert options["user_config"] == {
        "max_batch_size": 64,
        "max_batch_tokens": 8192,
        "batch_wait_timeout_s": 0.02,
    }


def overrides(path: str) -> dict[str, dict]:
    app = yaml.safe_load((ROOT / path).read_text())["applications"][0]
    return {d["name"]: d for d in app.get("deployments", [])}


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/gpu.yaml"])
def test_config_files_name_real_deployments(path):
    """Overrides in `deployments[]` name deployments that build_app creates, with valid configs."""
    models = {deployment_options(m)["name"] for m in AppConfig().models().values()}
    for name, override in overrides(path).items():
        assert name in models | set(ROUTE_DEPLOYMENTS)
        if name in models and "user_config" in override:
            Batching(**override["user_config"])
        if name == "Ingress" and "user_config" in override:
            overlay(IngressLive(), override["user_config"])
        if name == "Precompute" and "user_config" in override:
            PrecomputeLive(**override["user_config"])


def test_default_graph_fits_two_cores_at_max_replicas():
    config = AppConfig(**app_args("serve_config.yaml"))
    tuned = overrides("serve_config.yaml")
    cpus = {deployment_options(m)["name"]: m.num_cpus for m in (config.embedder, config.reranker)}
    cpus |= {
        name: o["ray_actor_options"]["num_cpus"] for name, (o, _) in generators(config).items()
    }
    cpus |= {name: d.ray_actor_options["num_cpus"] for name, d in ROUTE_DEPLOYMENTS.items()}
    assert "RagGenerator" in cpus  # RAG answers on a Generator of their own by default
    total = 0.0
    for name, share in cpus.items():
        override = tuned.get(name, {})  # RagGenerator: one replica, options from build_app
        fixed = ("Ingress", "Precompute", "RagGenerator")
        assert "autoscaling_config" in override or name in fixed
        replicas = override.get("autoscaling_config", {}).get("max_replicas", 1)
        total += share * override.get("num_replicas", replicas)
    assert tuned["Embedder"]["autoscaling_config"]["max_replicas"] >= 2
    assert total <= 2.0 + 1e-9  # summed fractions


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


def test_admission_overrides_merge_over_route_defaults():
    admission = overlay(Admission(), {"routes": {"chat": {"max_queued": 1}}})
    assert admission.routes["chat"].max_running == 8  # the default, kept
    assert admission.routes["chat"].max_queued == 1
    assert admission.routes["chat"].shed and not admission.routes["embeddings"].shed
    assert set(admission.routes) == {
        "embeddings",
        "rerank",
        "chat",
        "search",
        "rag",
        "ingest",
        "classify",
        "manage",
    }


@pytest.mark.parametrize(
    "user_config",
    [
        {"routes": {"chatt": {"max_running": 1}}},
        {"routes": {"chat": {"max_running": 0}}},
        {"shedding": {"memory_percent": 120}},
        {"retry_after": 1},
    ],
)
def test_bad_admission_is_rejected(user_config):
    with pytest.raises(ValidationError):
        overlay(Admission(), user_config)


def test_custom_resources_pin_a_model_to_the_nodes_that_have_them():
    config = AppConfig(embedder={"resources": {"models": 0.01}})
    options = deployment_options(config.embedder)["ray_actor_options"]
    assert options["resources"] == {"models": 0.01}
    assert "resources" not in deployment_options(config.reranker)["ray_actor_options"]


def test_overlay_keeps_what_args_set_and_merges_field_by_field():
    defaults = AppConfig(
        generator={
            "batching": {"max_batch_size": 4, "max_batch_tokens": 999, "batch_wait_timeout_s": 0.01}
        }
    ).generator.batching
    live = overlay(defaults, {"max_batch_size": 2})
    assert (live.max_batch_size, live.max_batch_tokens) == (2, 999)  # not the code default
    ingress = overlay(IngressLive(), {"routes": {"chat": {"max_queued": 1}}})
    assert ingress.routes["chat"].max_queued == 1
    assert ingress.routes["chat"].max_running == IngressLive().routes["chat"].max_running
    assert ingress.routes["rag"] == IngressLive().routes["rag"]
    assert overlay(defaults, None) == defaults
    with pytest.raises(ValidationError):
        overlay(defaults, {"max_batch_size": 0})


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/gpu.yaml"])
def test_the_chat_route_runs_as_many_answers_as_the_generator_decodes_at_once(path):
    """Fewer would queue chats in front of free decode slots; more would queue them inside the
    generator, where the route cannot count or shed them."""
    defaults = AppConfig().generator.batching.max_batch_size
    assert IngressLive().routes["chat"].max_running == defaults
    served = yaml.safe_load((ROOT / path).read_text())
    deployments = {d["name"]: d for d in served["applications"][0]["deployments"]}
    generator = deployments["Generator"].get("user_config", {}).get("max_batch_size", defaults)
    routes = deployments["Ingress"].get("user_config", {}).get("routes", {})
    assert routes.get("chat", {}).get("max_running", defaults) == generator
