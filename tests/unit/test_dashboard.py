"""configs/monitoring: the Grafana dashboard's structure, the alert rules, the Prometheus config;
scripts/monitor.py's commands (start, stop, kuberay, screenshot)."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "configs" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "rag-serve.json"
spec = importlib.util.spec_from_file_location("monitor", ROOT / "scripts" / "monitor.py")
monitor = importlib.util.module_from_spec(spec)
sys.modules["monitor"] = monitor
spec.loader.exec_module(monitor)

# Grafana's own variables, which need no definition in the dashboard.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]


def variables_used(value: object) -> set[str]:
    text = json.dumps(value)
    return set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"\$(\w+)", text))


def test_panel_ids_are_unique_and_grid_positions_do_not_overlap():
    panels = all_panels(load_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(ids)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['id']} overlaps another"
        cells |= mine


def test_every_variable_used_is_defined():
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in defined
    used = variables_used(dashboard["panels"]) - BUILTIN_VARIABLES
    assert used <= defined, used - defined


def test_every_panel_queries_prometheus_through_the_datasource_variable():
    dashboard = load_dashboard()
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    graphs = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["id"]
        assert panel["targets"], f"panel {panel['id']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["id"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["id"]
            assert target["datasource"] == panel["datasource"]


def test_one_row_per_concern():
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Routes", "Models", "Caches", "Host", "Replicas"]


def test_queries_name_only_exported_metric_names():
    """Ray exports app metrics with a `ray_` prefix and counters with `_total`: a query naming
    `rag_route_admitted` without either would chart nothing."""
    names = {n for q in queries(load_dashboard()) for n in re.findall(r"\b(\w*rag_\w+)", q)}
    assert names
    for name in names:
        assert name.startswith("ray_rag_"), name
    counters = {"admitted", "rejected", "timed_out", "hits", "misses", "decoded_tokens"}
    for name in names:
        if any(name.endswith(f"_{c}") for c in counters):
            raise AssertionError(f"{name}: counters are exported with _total")


def test_prometheus_config_points_at_the_discovery_file_and_the_rules(tmp_path):
    discovery = tmp_path / monitor.DISCOVERY_FILE
    config = monitor.prometheus_config(discovery, scrape_interval_s=2)
    assert config["rule_files"] == [str(MONITORING / "alerts.yml")]
    assert config["scrape_configs"][0]["file_sd_configs"] == [{"files": [str(discovery)]}]
    assert config["global"]["scrape_interval"] == "2s"
    # The template itself is left as it was (the defaults stay for `make monitor`).
    assert monitor.prometheus_config(discovery)["global"]["scrape_interval"] == "10s"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_alert_rules_pass_promtool():
    result = subprocess.run(
        ["promtool", "check", "rules", str(MONITORING / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert {
        "RouteRefusing",
        "ChatTTFTOverSLO",
        "DeploymentWithoutHealthyReplicas",
        "StoreUnreachable",
    } <= alerts


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_rendered_prometheus_config_passes_promtool(tmp_path):
    discovery = tmp_path / monitor.DISCOVERY_FILE
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ["127.0.0.1:1"]}]))
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(monitor.prometheus_config(discovery)))
    result = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stop_ends_only_the_recorded_processes(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "prometheus.pid").write_text(str(sleeper.pid))
        (tmp_path / "grafana.pid").write_text("999999999")  # already gone: no error
        assert monitor.stop(tmp_path) == [sleeper.pid]
        assert sleeper.wait(timeout=5) == -15
        assert bystander.poll() is None
        assert not list(tmp_path.glob("*.pid"))
    finally:
        bystander.kill()
        sleeper.kill()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_start_serves_the_rules_on_loopback_and_stop_ends_it(tmp_path):
    """`make monitor` and `make stop` end to end, against a session folder without a cluster."""
    session, state = tmp_path / "session", tmp_path / "state"
    session.mkdir()
    (session / monitor.DISCOVERY_FILE).write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": ["127.0.0.1:1"]}])
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = [sys.executable, str(ROOT / "scripts" / "monitor.py")]
    args = ["--session", str(session), "--state-dir", str(state), "--prometheus-port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_HOME"}
    env["PATH"] = str(Path(shutil.which("prometheus")).parent)  # no grafana-server on it
    subprocess.run([*script, "start", *args], check=True, env=env, timeout=90)
    pid = int((state / "prometheus.pid").read_text())
    try:
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).json()
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "RouteRefusing" in names and "StoreUnreachable" in names
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        local = {line.split()[1] for line in listening if line.split()[3] == "0A"}
        assert f"0100007F:{port:04X}" in local  # 127.0.0.1, and on no other address
        assert not {a for a in local if a.endswith(f":{port:04X}")} - {f"0100007F:{port:04X}"}
    finally:
        subprocess.run([*script, "stop", "--state-dir", str(state)], check=True, timeout=60)
    assert not monitor._alive(pid)
    assert not (state / "prometheus.pid").exists()


def test_the_pictures_graph_page_asks_each_query_over_the_range():
    end = "2026-01-02 03:04:05"
    url = monitor.graph_url("http://127.0.0.1:9090", monitor.SCREENSHOT_QUERIES, "5m", end)
    parts = urlsplit(url)
    assert (parts.netloc, parts.path) == ("127.0.0.1:9090", "/graph")
    params = parse_qs(parts.query)
    for k, query in enumerate(monitor.SCREENSHOT_QUERIES):
        assert params[f"g{k}.expr"] == [query]
        assert params[f"g{k}.range_input"] == ["5m"] and params[f"g{k}.tab"] == ["0"]
        assert params[f"g{k}.end_input"] == [end]
    assert f"g{len(monitor.SCREENSHOT_QUERIES)}.expr" not in params
    assert "end_input" not in monitor.graph_url("http://127.0.0.1:9090", ["up"])  # now
    # The picture charts what the dashboard charts: the same exported names.
    in_dashboard = " ".join(queries(load_dashboard()))
    for query in monitor.SCREENSHOT_QUERIES:
        for name in re.findall(r"\b(ray_\w+?)(?:_bucket|_sum|_count)?\b", query):
            assert name in in_dashboard, name


@pytest.mark.skipif(
    not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
    reason="chromium is not installed (apt-get install chromium)",
)
def test_screenshot_waits_for_the_pages_scripts_and_has_the_size_asked(tmp_path):
    """A page that paints itself red 3 s after loading, as Prometheus's graphs draw once their
    queries answer: the picture is taken after that, at the size asked."""
    import matplotlib.image

    page = "data:text/html,<body style='margin:0'><script>setTimeout(() => "
    page += "document.body.style.background = 'rgb(255,0,0)', 3000)</script></body>"
    out = tmp_path / "img" / "page.png"
    monitor.screenshot(page, out, 320, 240)
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (240, 320)
    assert tuple(pixels[120, 160][:3]) == (1.0, 0.0, 0.0)


def test_kuberay_pod_monitors_scrape_every_ray_pod_and_the_alerts_follow_their_jobs():
    monitors = list(yaml.safe_load_all((MONITORING / "kuberay.yaml").read_text()))
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    by_type = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: m for m in monitors}
    assert set(by_type) == {"head", "worker"}
    for monitor_ in monitors:
        ports = [e["port"] for e in monitor_["spec"]["podMetricsEndpoints"]]
        assert "metrics" in ports
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    (down,) = [r for r in rules if r["alert"] == "MetricsTargetDown"]
    pattern = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)
    for job in ["ray", *(m["spec"]["jobLabel"] for m in monitors)]:
        assert re.fullmatch(pattern, job), job


def test_kuberay_configmap_and_rules_are_generated_from_the_files():
    """The manifest is what `monitor.py kuberay` writes now: a dashboard or rule changed
    without regenerating it fails here instead of drifting on the cluster."""
    text = (MONITORING / "kuberay-dashboard.yaml").read_text()
    assert text == monitor.kuberay_manifest(), "run: python scripts/monitor.py kuberay"
    configmap, rule = yaml.safe_load_all(text)
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    ((name, carried),) = configmap["data"].items()
    assert name == DASHBOARD.name and json.loads(carried) == load_dashboard()
    assert rule["kind"] == "PrometheusRule"
    assert (
        rule["spec"]["groups"] == yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    )
    # The Prometheus that the PodMonitors feed selects these too.
    pod_monitor = next(yaml.safe_load_all((MONITORING / "kuberay.yaml").read_text()))
    release = pod_monitor["metadata"]["labels"]["release"]
    assert (
        configmap["metadata"]["labels"]["release"]
        == rule["metadata"]["labels"]["release"]
        == release
    )
