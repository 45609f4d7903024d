"""Prometheus (and Grafana, where installed) for the running Ray session, on 127.0.0.1 only.

    python scripts/monitor.py start   # after `make run`; Prometheus on 127.0.0.1:9090
    python scripts/monitor.py stop    # ends what `start` started
    python scripts/monitor.py kuberay # rewrites configs/monitoring/kuberay-dashboard.yaml
    python scripts/monitor.py screenshot  # docs/img/prometheus.png, of a load's minutes

Prometheus scrapes every Ray node through the service-discovery file that Ray's dashboard keeps
in its session folder, and loads configs/monitoring/alerts.yml. Grafana, when GRAFANA_HOME is
set or `grafana-server` is on the PATH, gets Ray's generated dashboards and this app's
(configs/monitoring/grafana/dashboards/). The Ray dashboard looks for Prometheus at
localhost:9090 and Grafana at localhost:3000 by default (RAY_PROMETHEUS_HOST,
RAY_GRAFANA_HOST), so its Metrics tab lights up with the default ports. Processes and data live
under --state-dir; their ids are kept there, and `stop` ends those and nothing else.

`kuberay` writes the same dashboard and rules as Kubernetes objects (a ConfigMap Grafana's
sidecar loads, a PrometheusRule), generated from the files above so they cannot drift apart.

`screenshot` renders Prometheus's own graph page of the route and batch metrics (--range of
them, up to --end or now) with a headless Chromium (Debian: apt-get install chromium) into
--out: the README's picture, taken during or after a load against the app.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "configs" / "monitoring"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DEFAULT_SESSION = Path("/tmp/ray/session_latest")
DEFAULT_STATE = Path("/tmp/rag-serve-monitor")
DASHBOARD = MONITORING / "grafana" / "dashboards" / "rag-serve.json"
KUBERAY_DASHBOARD = MONITORING / "kuberay-dashboard.yaml"
SCREENSHOT = ROOT / "docs" / "img" / "prometheus.png"
# The README's picture: what the routes admitted and how fast they answered, and what the
# models' batches held (items, tokens) and the generator decoded.
SCREENSHOT_QUERIES = [
    "sum by (route) (rate(ray_rag_route_admitted_total[1m]))",
    "histogram_quantile(0.99, sum by (route, le) (rate("
    'ray_serve_deployment_processing_latency_ms_bucket{deployment="Ingress",'
    'route=~"/v1/(embeddings|chat/completions)"}[1m])))',
    "sum by (deployment) (rate(ray_rag_batch_size_sum[1m]))"
    " / sum by (deployment) (rate(ray_rag_batch_size_count[1m]))",
    "sum by (deployment) (rate(ray_rag_batch_tokens_sum[1m]))"
    " / sum by (deployment) (rate(ray_rag_batch_tokens_count[1m]))",
    "sum(rate(ray_rag_generator_decoded_tokens_total[1m]))",
]
# Pixels of Prometheus's page per graph (query box, controls, chart, legend), and above them;
# wide enough for the longest query on one line.
GRAPH_HEIGHT_PX, PAGE_TOP_PX, SCREENSHOT_WIDTH_PX = 760, 100, 1920


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


def kuberay_objects() -> list[dict]:
    """The dashboard as a ConfigMap labelled for Grafana's sidecar (`grafana_dashboard: "1"`,
    the JSON file's text as it is) and the alert rules as a PrometheusRule, labelled like the
    PodMonitors of kuberay.yaml so the same Prometheus picks them up."""
    labels = {"release": "prometheus"}
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "rag-serve-dashboard",
                "labels": {**labels, "grafana_dashboard": "1"},
            },
            "data": {DASHBOARD.name: DASHBOARD.read_text()},
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "rag-serve-alerts", "labels": labels},
            "spec": {"groups": rules["groups"]},
        },
    ]


def kuberay_manifest() -> str:
    """kuberay-dashboard.yaml's text: `kuberay_objects()`, multi-line strings as blocks."""

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    header = (
        "# Generated by `python scripts/monitor.py kuberay` from\n"
        "# grafana/dashboards/rag-serve.json and alerts.yml (tests/unit/test_dashboard.py fails\n"
        "# when they differ): do not edit. `kubectl apply -f` it beside kuberay.yaml.\n"
    )
    body = yaml.dump_all(kuberay_objects(), Dumper=Dumper, sort_keys=False, width=120)
    return header + body


def graph_url(
    prometheus: str, queries: list[str], range_: str = "3m", end: str | None = None
) -> str:
    """Prometheus's graph page with one graph per query, each over `range_` up to `end`
    ("YYYY-MM-DD HH:MM:SS", UTC; None: now)."""
    params = {}
    for k, query in enumerate(queries):
        params |= {f"g{k}.expr": query, f"g{k}.tab": "0", f"g{k}.range_input": range_}
        if end is not None:
            params[f"g{k}.end_input"] = end
    return f"{prometheus}/graph?{urlencode(params)}"


def chromium_binary() -> str:
    """Chromium's (or Chrome's) command on the PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium found (Debian: apt-get install chromium)")


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int = 15_000) -> None:
    """`url` as a headless Chromium renders it, `width` x `height` pixels, into the PNG `out`.
    `wait_ms` of the page's virtual time pass first: its scripts query and draw the graphs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rag-serve-chromium-") as profile:
        argv = [
            chromium_binary(),
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ]
        if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
            argv.insert(1, "--no-sandbox")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")


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
    parser.add_argument("command", choices=["start", "stop", "kuberay", "screenshot"])
    parser.add_argument("--session", type=Path, default=DEFAULT_SESSION, help="Ray session")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--grafana-port", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=SCREENSHOT, help="screenshot: the PNG")
    parser.add_argument("--range", default="3m", help="screenshot: the graphs' time range")
    parser.add_argument("--end", help="screenshot: where the graphs end, UTC (default: now)")
    args = parser.parse_args()
    if args.command == "screenshot":
        end = None
        if args.end is not None:  # any ISO form, written in UTC as Prometheus's page reads it
            moment = datetime.fromisoformat(args.end)
            if moment.tzinfo is not None:
                moment = moment.astimezone(UTC)
            end = moment.strftime("%Y-%m-%d %H:%M:%S")
        prometheus = f"http://127.0.0.1:{args.prometheus_port}"
        try:
            httpx.get(f"{prometheus}/-/ready", timeout=5).raise_for_status()
        except httpx.HTTPError as e:
            sys.exit(f"no Prometheus ready at {prometheus} ({e}): make monitor first")
        url = graph_url(prometheus, SCREENSHOT_QUERIES, args.range, end)
        height = PAGE_TOP_PX + GRAPH_HEIGHT_PX * len(SCREENSHOT_QUERIES)
        screenshot(url, args.out, SCREENSHOT_WIDTH_PX, height)
        print(f"wrote {args.out}")
        return
    if args.command == "kuberay":
        KUBERAY_DASHBOARD.write_text(kuberay_manifest())
        print(f"wrote {KUBERAY_DASHBOARD.relative_to(ROOT)}")
        return
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
