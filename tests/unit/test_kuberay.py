"""configs/kuberay/rayservice.yaml: a RayService the KubeRay operator accepts, embedding a serve
config this application accepts, with GPU shares that fit its GPU workers."""

import re
from pathlib import Path

import jsonschema
import ray
import yaml

from serve_app.app import deployment_options
from serve_app.config import AppConfig, Batching, IngressLive, overlay
from serve_app.launch import fast_path_env
from tests.unit.test_config_and_plan import ROUTE_DEPLOYMENTS

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "configs" / "kuberay" / "rayservice.yaml"

# The fields of KubeRay's RayService CRD (ray.io/v1, ray-operator/config/crd/bases/
# ray.io_rayservices.yaml) that a manifest like this one uses, with their types; unknown keys
# are refused where the CRD refuses them, so a misspelt field fails here, not in the cluster.
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+[a-zA-Z]*$"}]}
RESOURCES = {
    "type": "object",
    "properties": {
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "requests": {"type": "object", "additionalProperties": QUANTITY},
    },
    "additionalProperties": False,
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "resources": RESOURCES,
        "volumeMounts": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "mountPath"]},
        },
    },
}
TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "tolerations": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}
UPSCALING_MODES = ["Default", "Aggressive", "Conservative"]
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
RAY_SERVICE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "serviceUnhealthySecondThreshold": {"type": "integer"},
                "deploymentUnhealthySecondThreshold": {"type": "integer"},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "serveService": {"type": "object"},
                "upgradeStrategy": {"type": "object"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "upscalingMode": {
                                    "enum": ["Default", "Aggressive", "Conservative"]
                                },
                                "idleTimeoutSeconds": {"type": "integer"},
                                "resources": RESOURCES,
                                "image": {"type": "string"},
                                "imagePullPolicy": {"type": "string"},
                                "env": {"type": "array"},
                                "envFrom": {"type": "array"},
                                "securityContext": {"type": "object"},
                                "volumeMounts": {"type": "array"},
                            },
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": START_PARAMS,
                                "template": TEMPLATE,
                                "serviceType": {"type": "string"},
                                "headService": {"type": "object"},
                                "enableIngress": {"type": "boolean"},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "idleTimeoutSeconds": {"type": "integer"},
                                    "numOfHosts": {"type": "integer"},
                                    "rayStartParams": START_PARAMS,
                                    "template": TEMPLATE,
                                    "scaleStrategy": {"type": "object"},
                                    "suspend": {"type": "boolean"},
                                },
                            },
                        },
                        "headServiceAnnotations": {"type": "object"},
                        "suspend": {"type": "boolean"},
                        "gcsFaultToleranceOptions": {"type": "object"},
                        "managedBy": {"type": "string"},
                    },
                },
            },
        },
    },
}


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def serve_config() -> dict:
    return yaml.safe_load(manifest()["spec"]["serveConfigV2"])


def test_the_manifest_has_the_rayservice_fields_and_types():
    jsonschema.validate(manifest(), RAY_SERVICE)
    broken = manifest()
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4  # a typo
    try:
        jsonschema.validate(broken, RAY_SERVICE)
    except jsonschema.ValidationError as error:
        assert "maxReplica" in error.message
    else:
        raise AssertionError("a misspelt field passed")


def test_it_embeds_a_serve_config_of_the_same_graph():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    [app] = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    config = AppConfig(**app.args)
    models = {deployment_options(m)["name"] for m in config.models().values()}
    names = {d.name for d in app.deployments}
    assert names == models | set(ROUTE_DEPLOYMENTS)  # every deployment of the graph is tuned
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    assert {d["name"] for d in local["deployments"]} == names
    for deployment in app.deployments:
        user_config = deployment.user_config
        if deployment.name in models:
            Batching.model_validate(user_config)
        elif deployment.name == "Ingress":
            settings = overlay(IngressLive(), user_config)
            assert settings.auth.api_keys_file is not None  # keys from the mounted Secret


def test_model_replicas_fit_the_gpu_workers_by_their_shares():
    config = AppConfig(**serve_config()["applications"][0]["args"])
    [gpu] = manifest()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = float(gpu["rayStartParams"]["num-gpus"])
    cpus = float(gpu["rayStartParams"]["num-cpus"])
    [container] = gpu["template"]["spec"]["containers"]
    assert float(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus
    assert float(container["resources"]["limits"]["cpu"]) >= cpus
    one_set = config.models().values()
    assert all(0 < m.num_gpus < 1 for m in one_set)  # fractional: they share a card
    assert sum(m.num_gpus for m in one_set) <= gpus
    assert sum(m.num_cpus for m in one_set) <= cpus
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert manifest()["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_versions_secrets_and_the_fast_path():
    cluster = manifest()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    dockerfile = (MANIFEST.parent / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", dockerfile, re.M)
    http = serve_config()["http_options"]
    assert http["host"] == "0.0.0.0"  # pod network only; the Service is the way in
    env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"DATABASE_URL", "REDIS_URL"} <= env  # one shared store and cache for all nodes
    # Secrets are referenced, never written here.
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]
    ]
    flags = fast_path_env()  # the same fast path as `make run`, on every node
    for container in containers:
        plain = {v["name"]: v["value"] for v in container["env"] if "value" in v}
        assert plain == flags
        for variable in container["env"]:
            if "value" not in variable:
                assert "secretKeyRef" in variable["valueFrom"]
