"""Bounded closed-loop HTTP load against one route of the service on this machine.

    .venv/bin/python scripts/loadtest.py --route chat --steps 1,5,50 --duration 60 \\
        [--url http://127.0.0.1:8000] [--out docs/benchmarks] [--name NAME] \\
        [--collection loadtest] [--max-tokens 32] [--poll 1.0] [--timeout 300] \\
        [--zipf 1.1 --queries 100 --seed 0] [--repeat] [--prometheus URL|off] [--smoke]

Routes: embeddings, rerank, chat, search, rag, ingest. Each step of --steps runs that many
clients for --duration seconds, one step after the other; each client sends a request, waits
for the answer and sends the next. Only 127.0.0.1, localhost and ::1 are accepted as targets;
a step runs at most 512 clients for at most 600 s.

Bodies read on through English sentences of 8-40 words taken from the license texts in
/usr/share/common-licenses; no text is sent twice (after the last sentence each comes back
numbered), so no cache answers, unless --repeat cycles the sentences as they are. For search
and rag, a seed corpus is ingested into --collection before the load starts. With --zipf S
(search and rag), each query is instead drawn from the first --queries sentences with
probability proportional to 1 / rank^S, as popular queries are asked in real traffic; the
report then counts answers by their cache (`precomputed`, `response`, or none) with the
latency of each.

While the load runs, /v1/status is polled every --poll seconds for the RUNNING replicas of each
deployment, the shedding monitor's CPU and memory use, and the route's running and queued
requests. Writes OUT/loadtest-NAME.json (per-step results and the sampled time series) and
OUT/loadtest-NAME.png (offered load and answers/s, latency per request, replicas over time).

With a Prometheus scraping the cluster (`make monitor`; --prometheus, default
http://127.0.0.1:9090, used when it answers, `off` to skip), the server's own series for the
run's time are read from it after the load: the route's latency p50/p99 in the Ingress replica
(`ray_serve_deployment_processing_latency_ms`), the route's queue wait p99
(`ray_rag_route_queue_wait_ms`) and the healthy replicas per deployment.
They go into the JSON under `server` and are drawn beside the client's figures: what the server
saw next to what the client saw. Without one, nothing changes.

An answer is any HTTP response; a transport error or client-side timeout is counted under the
status "error" and is not an answer. Latency percentiles are in milliseconds.

--smoke: one step of 2 clients for 3 seconds (unless --steps/--duration say otherwise), the
report written to a temporary folder unless --out names one.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from benchkit.loadgen import local_url
from benchkit.report import (
    add_output_options,
    command_line,
    output_dir,
    write_report,
)
from benchkit.routeload import ROUTES, LoadConfig, Run, build_report, run_load

MAX_CONCURRENCY = 512
MAX_DURATION_S = 600.0
DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"
# The rate window of the server-side quantiles: several of Ray's reports at make monitor's
# scrape interval (10 s), short enough to follow a step.
RATE_WINDOW = "30s"
# How long to wait after the load for Prometheus to scrape its last reports.
SCRAPE_WAIT_S = 25.0


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """Plain aligned text: one row per step and one overall."""
    header = (
        "clients",
        "requests",
        "ans/s",
        "200",
        "503",
        "other",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p95 200",
        "p95 503",
        "503 no RA",
        "max mem%",
    )
    rows = [header]
    labelled = [(str(r["concurrency"]), r) for r in report["results"]]
    for label, r in [*labelled, ("all", report["overall"])]:
        status = r["status"]
        other = sum(n for code, n in status.items() if code not in ("200", "503"))
        latency = r["latency_ms"]
        rows.append(
            (
                label,
                str(r["requests"]),
                _fmt(r["throughput_rps"], 1),
                str(status.get("200", 0)),
                str(status.get("503", 0)),
                str(other),
                _fmt(latency["all"]["p50"]),
                _fmt(latency["all"]["p95"]),
                _fmt(latency["all"]["p99"]),
                _fmt(latency["200"]["p95"]),
                _fmt(latency["503"]["p95"]),
                str(r["missing_retry_after_503"]),
                _fmt(r["max_memory_percent"], 1),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


# --- what the server saw (Prometheus) ---------------------------------------------------------
Series = dict[str, list[tuple[float, float]]]  # label -> [(seconds since the run's start, value)]


def server_queries(route: str) -> dict[str, str]:
    """PromQL per server-side series: the Ingress replica's latency of the route's path, the
    route's queue wait at admission, replicas per deployment.

    The latency is Serve's processing time in the Ingress replica, which Serve tags with the
    FastAPI route whichever proxy runs; its HTTP latency at the proxy carries only the
    application's prefix ("/") on the fast path (HAProxy)."""
    path, window = ROUTES[route], RATE_WINDOW

    def quantile(q: float, metric: str, selector: str) -> str:
        return (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[{window}])))"
        )

    latency, at_route = (
        "ray_serve_deployment_processing_latency_ms",
        f'deployment="Ingress",route="{path}"',
    )
    return {
        "latency_p50_ms": quantile(0.5, latency, at_route),
        "latency_p99_ms": quantile(0.99, latency, at_route),
        "queue_wait_p99_ms": quantile(0.99, "ray_rag_route_queue_wait_ms", f'route="{route}"'),
        "replicas": "sum by (deployment) (ray_serve_deployment_replica_healthy)",
    }


def prometheus_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for_scrape(client: httpx.Client, after: float, timeout_s: float = SCRAPE_WAIT_S) -> None:
    """Until Prometheus has scraped the cluster after `after` (epoch seconds), or the timeout:
    the load's last seconds are in Ray's next report."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = client.get("/api/v1/query", params={"query": "min(timestamp(up))"}).json()
        values = result["data"]["result"]
        if values and float(values[0]["value"][1]) > after:
            return
        time.sleep(1.0)


def server_series(url: str, route: str, start: float, end: float) -> dict[str, Series]:
    """Each of `server_queries` over [start, end] (epoch seconds), by label, with times as
    seconds since `start`; a series with no samples in the window is left out."""
    step = max(1.0, (end - start) / 300)
    out: dict[str, Series] = {}
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        wait_for_scrape(client, end + 5.0)
        for name, promql in server_queries(route).items():
            params = {"query": promql, "start": start, "end": end, "step": step}
            answer = client.get("/api/v1/query_range", params=params)
            answer.raise_for_status()
            series: Series = {}
            for result in answer.json()["data"]["result"]:
                label = result["metric"].get("deployment", name)
                points = [(float(t) - start, float(v)) for t, v in result["values"]]
                points = [(t, v) for t, v in points if math.isfinite(v)]
                if points:
                    series[label] = points
            out[name] = series
    return out


# --- plot -------------------------------------------------------------------------------------
def _status_class(status: str) -> str:
    """200, 503, or other (any other code, or a client-side error)."""
    return status if status in ("200", "503") else "other"


def plot(report: dict[str, Any], run: Run, path: Path) -> None:
    """Offered load and answers/s, latency per request, and RUNNING replicas over time; with
    the server's series (`report["server"]`), its latency quantiles and queue wait over the
    client's latencies, and its healthy replicas (dashed) beside the sampled ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"200": "tab:green", "503": "tab:orange", "other": "tab:red"}
    fig, (load_ax, latency_ax, replica_ax) = plt.subplots(
        3, 1, sharex=True, figsize=(11, 10), constrained_layout=True
    )
    steps = ",".join(str(s) for s in report["steps"])
    fig.suptitle(f"loadtest {report['route']}: steps {steps} x {report['duration']:g} s")

    end = max([w.end for w in run.windows] + [r.t + r.latency for r in run.records] + [1.0])
    buckets = math.ceil(end)
    bottom = np.zeros(buckets)
    for label in ("200", "503", "other"):
        done = [int(r.t + r.latency) for r in run.records if _status_class(r.status) == label]
        if not done:
            continue
        counts = np.bincount(np.minimum(done, buckets - 1), minlength=buckets)
        load_ax.bar(
            np.arange(buckets),
            counts,
            width=1.0,
            align="edge",
            bottom=bottom,
            color=colors[label],
            label=f"{label}/s",
        )
        bottom += counts
    load_ax.set_ylabel("answers per second")
    offered = load_ax.twinx()
    if run.windows:
        xs = [w.start for w in run.windows] + [run.windows[-1].end]
        ys = [w.concurrency for w in run.windows] + [run.windows[-1].concurrency]
        offered.plot(xs, ys, drawstyle="steps-post", color="black", lw=1.5, label="clients")
    offered.set_ylabel("clients (offered load)")
    offered.set_ylim(bottom=0)
    handles = load_ax.get_legend_handles_labels()[0] + offered.get_legend_handles_labels()[0]
    load_ax.legend(handles=handles, loc="upper left", fontsize="small")

    for label in ("200", "503", "other"):
        chosen = [r for r in run.records if _status_class(r.status) == label]
        if chosen:
            latency_ax.scatter(
                [r.t for r in chosen],
                [max(r.latency, 1e-4) for r in chosen],
                s=4,
                alpha=0.5,
                color=colors[label],
                label=label,
                rasterized=True,
            )
    server = (report.get("server") or {}).get("series", {})
    styles = {"latency_p50_ms": "-", "latency_p99_ms": "--", "queue_wait_p99_ms": ":"}
    for name, style in styles.items():
        for points in server.get(name, {}).values():
            xs, ys = zip(*points, strict=True)
            label = f"server {name.removesuffix('_ms').replace('_', ' ')}"
            ys = [max(y / 1000.0, 1e-4) for y in ys]
            latency_ax.plot(xs, ys, style, color="tab:blue", lw=1.5, label=label)
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("latency (s)")
    if run.records or server:
        latency_ax.legend(loc="upper left", fontsize="small", markerscale=3)

    healthy = server.get("replicas", {})
    names = sorted({name for s in run.samples for name in s["replicas"]} | set(healthy))
    times = [s["t"] for s in run.samples]
    palette = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        color = palette(k % 10)
        counts = [s["replicas"].get(name, 0) for s in run.samples]
        if times:
            replica_ax.step(times, counts, where="post", color=color, label=name)
        if name in healthy:  # the same deployment's colour, dashed: as Prometheus saw it
            xs, ys = zip(*healthy[name], strict=True)
            label = "_nolegend_" if times else name
            replica_ax.step(xs, ys, where="post", ls="--", lw=1, color=color, label=label)
    if names:
        title = "solid: /v1/status RUNNING, dashed: Prometheus healthy" if healthy else None
        replica_ax.legend(loc="upper left", fontsize="small", ncol=3, title=title)
    else:
        replica_ax.text(
            0.5, 0.5, "no /v1/status samples", ha="center", transform=replica_ax.transAxes
        )
    replica_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    most = [c for s in run.samples for c in s["replicas"].values()]
    most += [v for points in healthy.values() for _, v in points]
    replica_ax.set_ylim(-0.2, max([*most, 1]) + 0.5)
    replica_ax.set_ylabel("replicas")
    replica_ax.set_xlabel("time since start (s)")

    for ax in (load_ax, latency_ax, replica_ax):
        for window in run.windows[1:]:
            ax.axvline(window.start, color="gray", ls=":", lw=0.8)
        ax.set_xlim(0, end)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry ------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """The per-step table, with the command that produced it."""
    steps = ",".join(str(n) for n in report["steps"])
    return (
        f"# Load test: {report['route']}, steps {steps} x {report['duration']:g} s\n\n"
        f"Command: `{report['command']}`  \nStarted {report['started_at']} on "
        f"{report['host']['node']} ({report['host']['cpu_count']} cores).\n\n"
        f"```\n{format_table(report)}\n```\n"
    )


def execute(
    cfg: LoadConfig, sentences: Sequence[str] | None = None, prometheus: str | None = None
) -> dict[str, Any]:
    """Run the load and write loadtest-NAME.json, .md and .png under cfg.out; with
    `prometheus` answering, the server's series of the run go in too."""
    run = asyncio.run(run_load(cfg, sentences))
    ended = time.time()
    report = build_report(cfg, run)
    if prometheus and prometheus_ready(prometheus):
        started = datetime.fromisoformat(run.started_at).timestamp()
        report["server"] = {
            "prometheus": prometheus,
            "queries": server_queries(cfg.route),
            "series": server_series(prometheus, cfg.route, started, ended),
        }
    write_report(
        report,
        f"loadtest-{cfg.name}",
        markdown,
        cfg.out,
        plot=lambda report, path: plot(report, run, path),
    )
    return report


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be integers, got {text!r}") from None
    if not steps or any(not 1 <= s <= MAX_CONCURRENCY for s in steps):
        raise argparse.ArgumentTypeError(f"each step must be between 1 and {MAX_CONCURRENCY}")
    return steps


def parse_args(argv: Sequence[str] | None = None) -> LoadConfig:
    return parse(argv)[0]


def parse(argv: Sequence[str] | None = None) -> tuple[LoadConfig, str | None]:
    """The load's configuration, and the Prometheus to read the server's series from (None
    with `--prometheus off`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", required=True, choices=sorted(ROUTES))
    parser.add_argument("--steps", type=parse_steps, help="e.g. 1,5,50 (required but in smoke)")
    parser.add_argument("--duration", type=float, help="seconds per step (required but in smoke)")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    add_output_options(parser, "one step of 2 clients for 3 s")
    parser.add_argument("--name", help="output name (default: the route)")
    parser.add_argument("--collection", default="loadtest")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--ramp", type=float, default=5.0, help="seconds over which a step's clients start"
    )
    parser.add_argument("--zipf", type=float, help="search/rag: Zipf exponent of the query mix")
    parser.add_argument("--queries", type=int, default=100, help="distinct queries in the mix")
    parser.add_argument("--seed", type=int, default=0, help="of the query mix")
    parser.add_argument(
        "--repeat", action="store_true", help="cycle the sentences as they are: caches may answer"
    )
    parser.add_argument(
        "--no-seed",
        dest="seed_corpus",
        action="store_false",
        help="search/rag: the --collection already holds the seed corpus",
    )
    parser.add_argument(
        "--no-retry-wait",
        dest="wait_retry_after",
        action="store_false",
        help="retry a 503 at once instead of waiting its Retry-After",
    )
    parser.add_argument(
        "--prometheus",
        default=DEFAULT_PROMETHEUS,
        help="read the server's series from it when it answers ('off' to skip)",
    )
    args = parser.parse_args(argv)
    prometheus = None
    if args.prometheus != "off":
        try:
            prometheus = local_url(args.prometheus)
        except ValueError as e:
            parser.error(f"--prometheus: {e}")
    if args.smoke:
        args.steps, args.duration = args.steps or [2], args.duration or 3.0
        args.ramp = min(args.ramp, 1.0)
    if args.steps is None or args.duration is None:
        parser.error("--steps and --duration are required (but with --smoke)")
    try:
        url = local_url(args.url)
    except ValueError as e:
        parser.error(f"--url: {e}")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if args.poll < 0.1 or args.timeout <= 0 or args.max_tokens < 1:
        parser.error("--poll must be at least 0.1, --timeout and --max-tokens positive")
    if args.zipf is not None and (args.zipf <= 0 or args.queries < 1):
        parser.error("--zipf and --queries must be positive")
    name = args.name or args.route
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        parser.error(f"--name {name!r} must be letters, digits, '_', '.' or '-'")
    cfg = LoadConfig(
        url=url,
        route=args.route,
        steps=args.steps,
        duration=args.duration,
        out=output_dir(args),
        name=name,
        collection=args.collection,
        max_tokens=args.max_tokens,
        poll=args.poll,
        timeout=args.timeout,
        wait_retry_after=args.wait_retry_after,
        seed_corpus=args.seed_corpus,
        ramp=args.ramp,
        zipf=args.zipf,
        queries=args.queries,
        seed=args.seed,
        repeat=args.repeat,
        command=command_line(),
    )
    return cfg, prometheus


def main(argv: Sequence[str] | None = None) -> None:
    cfg, prometheus = parse(argv)
    try:
        execute(cfg, prometheus=prometheus)
    except RuntimeError as e:
        raise SystemExit(f"loadtest: {e}") from None


if __name__ == "__main__":
    main()
