"""Cold start: seconds from `serve run serve_config.yaml` until `/ready` answers 200.

`/ready` turns 200 only when every model has loaded and warmed up, and the document store
answers, so this is the time until the service can take its first request. Two kinds of start:
- `first`: an empty model cache folder, as on a new machine: the bundled GGUF generator is
  converted once and `auto` precision measures its candidates;
- `warm`: the same folder again, as on every later start (the default cache folder).

Each start is its own Ray cluster: the script refuses to run while another one is up.

    .venv/bin/python scripts/bench_coldstart.py --starts first,warm,warm [--out DIR]
    .venv/bin/python scripts/bench_coldstart.py --smoke  # one warm start, report in a temp folder
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml
from benchkit.cluster import config_url, ray_running, serve_run
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    cpu_model,
    output_dir,
    write_report,
)

TARGET_S = 30.0


def start_once(config: Path, url: str, env: dict[str, str], log: Path, timeout_s: float) -> dict:
    """One `serve run`: time to /ready, then the models' own load times from /v1/status."""
    with serve_run(config, url, log, env, timeout_s) as ready_s:
        models = httpx.get(f"{url}/v1/status", timeout=30).json()["models"]
    return {
        "ready_s": round(ready_s, 2),
        "models": {
            role: {
                "load_s": info.get("load_s"),
                "precision": info.get("precision"),
                "precision_measured": info.get("precision_measured"),
            }
            for role, info in models.items()
        },
    }


def markdown(report: dict) -> str:
    lines = [
        "# Cold start",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']}; {report['date']}. Config: `{report['config']}`. "
        f"Seconds from `serve run` until `/ready` answers 200 (every model loaded and warmed "
        f"up, the store open); target <= {TARGET_S:.0f} s. `load_s`: each model replica's own "
        "load and warm-up, inside that time.",
        "",
        "| start | to ready (s) | embedder load (s) | reranker load (s) | generator load (s) "
        "| precisions | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        m = run["models"]
        load = [str(m.get(r, {}).get("load_s", "")) for r in ("embedder", "reranker", "generator")]
        precisions = ", ".join(f"{r} {i['precision']}" for r, i in m.items())
        met = "met" if run["ready_s"] <= TARGET_S else "not met"
        lines.append(
            f"| {run['start']} | {run['ready_s']} | {' | '.join(load)} | {precisions} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--starts", default="first,warm", help="first and/or warm, in order")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out-name", default="coldstart")
    add_output_options(parser, "one warm start")
    options = parser.parse_args()
    if options.smoke:
        options.starts = "warm"
    if ray_running():
        sys.exit("A Ray cluster is already running here: stop it first (ray stop).")
    url = config_url(yaml.safe_load(options.config.read_text()))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    fresh = Path(tempfile.mkdtemp(prefix="rag-coldstart-"))
    runs = []
    for n, kind in enumerate(options.starts.split(",")):
        run_env = dict(env)
        if kind == "first":
            fresh = Path(tempfile.mkdtemp(prefix="rag-coldstart-"))
            run_env["RAG_MODEL_CACHE_DIR"] = str(fresh)
        elif kind != "warm":
            sys.exit(f"unknown start {kind!r}: first or warm")
        log = Path(tempfile.gettempdir()) / f"coldstart-{n}-{kind}.log"
        result = {"start": kind, **start_once(options.config, url, run_env, log, options.timeout)}
        print(json.dumps(result), flush=True)
        runs.append(result)
    report = {
        "command": command_line(),
        "config": options.config.name,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "target_s": TARGET_S,
        "runs": runs,
    }
    write_report(report, options.out_name, markdown, output_dir(options))


if __name__ == "__main__":
    main()
