"""Prometheus (and Grafana, where installed) for the running Ray session, on 127.0.0.1 only.

    python scripts/monitor.py start   # after `make run`; Prometheus on 127.0.0.1:9090
    python scripts/monitor.py stop    # ends what `start` started

Prometheus scrapes every Ray node through the service-discovery file that Ray's dashboard keeps
in its session folder, and loads configs/monitoring/alerts.yml. Grafana, when GRAFANA_HOME is
set or `grafana-server` is on the PATH, gets Ray's generated dashboards and this app's
(configs/monitoring/grafana/dashboards/). The Ray dashboard looks for Prometheus at
localhost:9090 and Grafana at localhost:3000 by default (RAY_PROMETHEUS_HOST,
RAY_GRAFANA_HOST), so its Metrics tab lights up with the default ports. Processes and data live
under --state-dir; their ids are kept there, and `stop` ends those and nothing else.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "configs" / "monitoring"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DEFAULT_SESSION = Path("/tmp/ray/session_latest")
DEFAULT_STATE = Path("/tmp/rag-serve-monitor")


def prometheus_config(discovery: Path, scrape_interval_s: float | None = None) -> dict:
    """configs/monitoring/prometheus.yml with the discovery file and the alert rules filled in."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    (job,) = config["scrape_configs"]
    job["file_sd_configs"] = [{"files": [str(discovery)]}]
    if scrape_interval_s is not None:
        interval = f"{scrape_interval_s:g}s"
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    return config


def start_prometheus(
    discovery: Path, state_dir: Path, port: int, scrape_interval_s: float | None = None
) -> subprocess.Popen:
    """Prometheus on 127.0.0.1:`port`, its config and data under `state_dir`; ready on return."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed (Debian: apt-get install prometheus)")
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = state_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(discovery, scrape_interval_s)))
    process = _spawn(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={state_dir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        state_dir / "prometheus.log",
        os.environ,
    )
    _wait_ready(f"http://127.0.0.1:{port}/-/ready", process)
    return process


def grafana_binary() -> tuple[Path, Path] | None:
    """(grafana-server, its home folder) from GRAFANA_HOME or the PATH, or None."""
    home = os.environ.get("GRAFANA_HOME")
    if home:
        return Path(home) / "bin" / "grafana-server", Path(home)
    found = shutil.which("grafana-server")
    if found is None:
        return None
    # Debian's and the official packages keep the home folder here; tarballs beside bin/.
    packaged = Path("/usr/share/grafana")
    return Path(found), packaged if packaged.is_dir() else Path(found).resolve().parents[1]


def start_grafana(
    session: Path, state_dir: Path, port: int, prometheus_port: int
) -> subprocess.Popen | None:
    """Grafana on 127.0.0.1:`port` with Ray's and this app's dashboards, if installed."""
    found = grafana_binary()
    if found is None:
        return None
    binary, home = found
    env = {
        **os.environ,
        "PROMETHEUS_URL": f"http://127.0.0.1:{prometheus_port}",
        "RAY_DASHBOARDS_DIR": str(session / "metrics" / "grafana" / "dashboards"),
        "RAG_DASHBOARDS_DIR": str(MONITORING / "grafana" / "dashboards"),
        "GF_PATHS_PROVISIONING": str(MONITORING / "grafana" / "provisioning"),
        "GF_PATHS_DATA": str(state_dir / "grafana-data"),
        "GF_PATHS_LOGS": str(state_dir / "grafana-logs"),
        "GF_SERVER_HTTP_ADDR": "127.0.0.1",
        "GF_SERVER_HTTP_PORT": str(port),
        # What the Ray dashboard needs to embed the charts: iframes and anonymous viewers.
        "GF_SECURITY_ALLOW_EMBEDDING": "true",
        "GF_AUTH_ANONYMOUS_ENABLED": "true",
        "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
    }
    process = _spawn([str(binary), f"--homepath={home}"], state_dir / "grafana.log", env)
    _wait_ready(f"http://127.0.0.1:{port}/api/health", process)
    return process


def _spawn(argv: list[str], log: Path, env: os._Environ | dict) -> subprocess.Popen:
    # A session of its own: the process outlives this script and a Ctrl-C in its terminal.
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}; see its log")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"{url} did not answer within {timeout_s:g} s")


def stop(state_dir: Path) -> list[int]:
    """End the processes `start` recorded under `state_dir`; the ids of those it signalled."""
    ended = []
    for pid_file in sorted(state_dir.glob("*.pid")):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            ended.append(pid)
        except ProcessLookupError:
            pass  # already gone
        pid_file.unlink()
    for pid in ended:  # Prometheus flushes its head block on SIGTERM: give it a moment
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
    return ended


def _alive(pid: int) -> bool:
    """Running, neither gone nor a zombie (one that exited, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--session", type=Path, default=DEFAULT_SESSION, help="Ray session")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--grafana-port", type=int, default=3000)
    args = parser.parse_args()
    if args.command == "stop":
        ended = stop(args.state_dir)
        print(f"stopped {len(ended)} monitoring process(es)")
        return
    discovery = args.session.resolve() / DISCOVERY_FILE
    if not discovery.exists():
        sys.exit(f"{discovery} is missing: start the app first (make run), dashboard included")
    stop(args.state_dir)  # a second `start` replaces the first
    prometheus = start_prometheus(discovery, args.state_dir, args.prometheus_port)
    (args.state_dir / "prometheus.pid").write_text(str(prometheus.pid))
    print(f"Prometheus: http://127.0.0.1:{args.prometheus_port}")
    grafana = start_grafana(
        args.session.resolve(), args.state_dir, args.grafana_port, args.prometheus_port
    )
    if grafana is None:
        print("Grafana is not installed (see docs/observability.md); Prometheus only")
        return
    (args.state_dir / "grafana.pid").write_text(str(grafana.pid))
    print(f"Grafana: http://127.0.0.1:{args.grafana_port}/d/rag-serve")


if __name__ == "__main__":
    main()
