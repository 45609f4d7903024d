"""Deploy a serve config file onto a Ray cluster from Python, as `serve run`/`serve deploy` do.

Used by the integration tests and the benchmarks, so both run exactly what users run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import yaml

FAST_PATH_FILE = Path(__file__).resolve().parents[1] / "configs" / "fastpath.env"


def fast_path_env(path: Path = FAST_PATH_FILE) -> dict[str, str]:
    """Ray Serve's fast-path flags (configs/fastpath.env: `NAME=value` lines, `#` comments),
    for the environment of whatever starts a Ray cluster."""
    flags = {}
    for line in path.read_text().splitlines():
        name, equals, value = line.partition("=")
        if equals and not name.lstrip().startswith("#"):
            flags[name.strip()] = value.strip()
    return flags


def load_config(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def deploy(config: dict[str, Any], overrides: list[dict[str, Any]] | None = None) -> str:
    """Apply `config` (a serve config with one application) and return its base URL.

    `overrides` are merged by name into the application's `deployments` list, the way a user
    edits that list to change `user_config` live.
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    app = config["applications"][0]
    merged = {d["name"]: d for d in app.get("deployments", [])}
    for override in overrides or []:
        merged[override["name"]] = {**merged.get(override["name"], {}), **override}
    schema = ServeDeploySchema.model_validate(
        {**config, "applications": [{**app, "deployments": list(merged.values())}]}
    )
    client = serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema)
    return f"http://{schema.http_options.host}:{schema.http_options.port}"


def wait_ready(base_url: str, timeout_s: float = 300.0) -> None:
    """Block until `/ready` answers 200: every model deployment has loaded."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while True:
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} was not ready within {timeout_s:.0f} s")
            time.sleep(0.5)
