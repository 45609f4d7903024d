"""The app on a Ray cluster of its own for the length of a block, then torn down.

Two ways, both running exactly what users run (the serve config, deployed as `serve run`
does): `in_process` starts Ray inside this script and deploys a config dict with
`serve_app.launch.deploy` (the script can then also reach the cluster's objects); `serve_run`
starts `serve run CONFIG` as a child process, for measuring what a user sees (start-up time,
shedding under real processes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchkit.report import BIN, ROOT
from serve_app.launch import fast_path_env


def config_url(config: dict[str, Any]) -> str:
    """The base URL a serve config's http_options put the app on."""
    http = config.get("http_options") or {}
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"


def with_args(config: dict[str, Any], **args: Any) -> dict[str, Any]:
    """The serve config with its one application's `args` updated by `args`."""
    app = config["applications"][0]
    return {**config, "applications": [{**app, "args": {**app.get("args", {}), **args}}]}


def answers(url: str) -> bool:
    """Whether anything answers at `url` (any status)."""
    try:
        httpx.get(url, timeout=5, trust_env=False)
        return True
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def in_process(
    config: dict[str, Any],
    num_cpus: int | None = 2,
    ready_timeout_s: float = 600.0,
    overrides: list[dict[str, Any]] | None = None,
) -> Iterator[str]:
    """A fresh local Ray cluster with `config` deployed; yields the app's base URL once
    /ready answers. Refuses to start while something already answers on that URL, and shuts
    down only the cluster it started."""
    import ray
    from ray import serve

    from serve_app.launch import deploy, fast_path_env, wait_ready

    url = config_url(config)
    if answers(url + "/healthz"):
        raise SystemExit(f"something already answers at {url}: stop it first")
    for name, value in fast_path_env().items():  # `make run`'s, unless the environment says
        os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        base = deploy(config, overrides)
        wait_ready(base, timeout_s=ready_timeout_s)
        yield base
    finally:
        # Connected to our own cluster: serve.shutdown() cannot reach anyone else's.
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def redeploy(config: dict[str, Any], overrides: list[dict[str, Any]] | None = None) -> str:
    """Apply a changed config to the cluster `in_process` started (live settings, args)."""
    from serve_app.launch import deploy

    return deploy(config, overrides)


def ray_running() -> bool:
    """Whether a Ray cluster already runs on this machine."""
    return subprocess.run([BIN / "ray", "status"], capture_output=True).returncode == 0


@contextlib.contextmanager
def serve_run(
    config: Path, url: str, log: Path, env: dict[str, str] | None = None, timeout_s: float = 600.0
) -> Iterator[float]:
    """`serve run config` (its output in `log`) until the block ends; yields the seconds until
    /ready answered 200. The cluster it started is stopped afterwards. `env` (default: this
    one, over `make run`'s fast-path flags) is the whole environment of `serve run`."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [BIN / "serve", "run", str(config)],
            cwd=ROOT,
            env=env if env is not None else {**fast_path_env(), **os.environ},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(base_url=url, timeout=5, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve run exited with {proc.returncode}; see {log}")
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"not ready within {timeout_s:.0f} s; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ready").status_code == 200:
                        break
                time.sleep(0.25)
        yield time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([BIN / "ray", "stop", "--force"], capture_output=True)
