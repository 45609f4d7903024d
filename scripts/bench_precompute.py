"""Precomputed answers for popular queries: a Zipf query mix with and without them.

    .venv/bin/python scripts/bench_precompute.py [--zipf 1.1] [--queries 100] \\
        [--search-clients 4 --search-s 30] [--rag-clients 2 --rag-s 90] [--top-n 20] \
        [--out docs/benchmarks] [--smoke]

Starts a local Ray cluster and configs/test.yaml (an empty embedded PostgreSQL in a temporary
folder), then for search and for RAG runs the same Zipf-distributed load (the load test's,
same seed; one client, then several) twice:
- without: the Precompute job disabled; search still has its response cache;
- with: the job enabled (every 5 s, the top --top-n requests), after a pass has computed the
  answers ranked by the first run's counts. It keeps running during the load.
Reports, per route and run, the share of 200s answered from a cache by source, and p50/p99
latency overall and by source. Writes OUT/precompute.json and .md.

--smoke: 10 queries, 2 search clients for 2 s, 1 RAG client for 3 s, 8-token answers.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from benchkit import routeload
from benchkit.cluster import in_process, redeploy, with_args
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    machine,
    output_dir,
    percentiles_ms,
    write_report,
)

from serve_app.launch import load_config

# min_count 1: the first run's RAG requests are few (seconds each on 2 cores).
SCHEDULE = {"interval_s": 5, "min_count": 1, "window_s": 86400, "max_age_s": 3600}


def app_config(data_dir: Path) -> dict:
    config = load_config(ROOT / "configs" / "test.yaml")
    return with_args(config, store={"data_dir": str(data_dir)})


def schedule(**settings) -> list[dict]:
    """The Precompute job's user_config, as an override of the config's deployments."""
    return [{"name": "Precompute", "user_config": {**SCHEDULE, **settings}}]


def settled(url: str, kind: str, since: float, timeout_s: float = 600.0) -> dict:
    """The job's first pass started after `since` (epoch s) that ranked requests and found
    every one fresh: the answers the earlier run's counts call for are all computed."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        while time.monotonic() < deadline:
            status = client.get("/v1/status").json()["precompute"]
            last = status["schedule"]["last_pass"]
            if (
                last
                and last["started_at"] > since
                and last["ranked"]
                and last["fresh"] == last["ranked"]
                and status["answers"][kind]
            ):
                return {"last_pass": last, "answers": status["answers"]}
            time.sleep(1.0)
    raise TimeoutError("the Precompute job did not settle")


def run(url: str, route: str, clients: int, seconds: float, args, seed_corpus: bool) -> list:
    """One client (latency alone), then `clients` (under load), `seconds` each."""
    cfg = routeload.LoadConfig(
        url=url,
        route=route,
        steps=[1, clients],
        duration=seconds,
        out=Path(tempfile.gettempdir()),  # unused: the steps are summarized here
        name=f"precompute-{route}",
        collection=f"popular-{route}",
        seed_corpus=seed_corpus,  # seeding again would change the collection
        max_tokens=args.max_tokens,
        ramp=0.0,
        zipf=args.zipf,
        queries=args.queries,
        seed=args.seed,
    )
    steps = routeload.step_results(asyncio.run(routeload.run_load(cfg)))
    return [
        {
            "clients": step["concurrency"],
            "seconds": step["elapsed_s"],
            "requests": step["requests"],
            "ok_rps": step["ok_rps"],
            "status": step["status"],
            "latency_ms": step["latency_ms"]["200"],
            "cache": step["cache"],
        }
        for step in steps
    ]


async def floor_ms(url: str, requests: int = 1000) -> dict:
    """GET /healthz one at a time: the proxy and ingress alone, the least any answer costs."""
    latencies = []
    async with aiohttp.ClientSession(base_url=url) as client:
        for _ in range(requests):
            start = time.perf_counter()
            async with client.get("/healthz") as response:
                await response.read()
            latencies.append(time.perf_counter() - start)
    return percentiles_ms(latencies)


def markdown(report: dict) -> str:
    mix = report["mix"]
    lines = [
        "# Precomputed answers for popular queries",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
        f"app: configs/test.yaml. Query mix: Zipf s={mix['zipf']} over {mix['queries']} "
        f"distinct queries (seed {mix['seed']}), the same sequence in both runs. Job: every "
        f"{SCHEDULE['interval_s']} s, the top {report['top_n']} requests "
        f"(min_count {SCHEDULE['min_count']}).",
        "",
        "| route | precompute | clients | 200/s | hit rate | precomputed | response cache "
        "| miss | p50 ms | p99 ms | p50 precomputed | p50 response cache | p50 miss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for route, runs in report["routes"].items():
        for label, r in [(name, r) for name in ("without", "with") for r in runs[name]]:
            by = r["cache"]["by_source"]

            def count(source, by=by):
                return by.get(source, {}).get("count", 0)

            def p50(source, by=by):
                value = by.get(source, {}).get("latency_ms", {}).get("p50")
                return "-" if value is None else f"{value:.1f}"

            lines.append(
                f"| {route} | {label} | {r['clients']} | {r['ok_rps']:.2f} "
                f"| {r['cache']['hit_rate']:.1%} | {count('precomputed')} "
                f"| {count('response')} | {count('none')} | {r['latency_ms']['p50']:.1f} "
                f"| {r['latency_ms']['p99']:.1f} | {p50('precomputed')} | {p50('response')} "
                f"| {p50('none')} |"
            )
    lines += [
        "",
        f"The floor: `GET /healthz`, one client, p50 {report['healthz_ms']['p50']:.1f} ms, "
        f"p99 {report['healthz_ms']['p99']:.1f} ms (the proxy and the ingress, no work).",
        "",
        "Latency is from the client's send to the whole answer, over HTTP on this machine, "
        "for 200s. `hit rate`: the share of 200s answered from a cache (precomputed, or the "
        "search route's response cache). Ratios are of one run on a shared machine.",
        "",
    ]
    for route, runs in report["routes"].items():
        job = runs["job"]
        lines.append(
            f"- {route}: the `with` run started once the job held {job['answers'][route]} "
            f"{route} answers, its last pass finding all {job['last_pass']['ranked']} ranked "
            "requests fresh."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--search-clients", type=int, default=4)
    parser.add_argument("--search-s", type=float, default=30.0, help="per step")
    parser.add_argument("--rag-clients", type=int, default=2)
    parser.add_argument("--rag-s", type=float, default=90.0, help="per step")
    parser.add_argument("--max-tokens", type=int, default=32)
    add_output_options(parser, "10 queries; 2 search clients 2 s, 1 RAG client 3 s")
    args = parser.parse_args()
    floor_requests = 1000
    if args.smoke:
        args.queries, args.top_n, args.max_tokens = 10, 5, 8
        args.search_clients, args.search_s, args.rag_clients, args.rag_s = 2, 2.0, 1, 3.0
        floor_requests = 20

    config = app_config(Path(tempfile.mkdtemp(prefix="rag-bench-")) / "pgdata")
    with in_process(config, overrides=schedule(enabled=False, top_n=args.top_n)) as url:
        healthz = asyncio.run(floor_ms(url, floor_requests))
        routes = {}
        for route, clients, seconds in (
            ("search", args.search_clients, args.search_s),
            ("rag", args.rag_clients, args.rag_s),
        ):
            redeploy(config, schedule(enabled=False, top_n=args.top_n))
            without = run(url, route, clients, seconds, args, seed_corpus=True)
            print(route, "without", without)
            since = time.time()
            redeploy(config, schedule(enabled=True, top_n=args.top_n, kinds=[route]))
            job = settled(url, route, since)
            with_ = run(url, route, clients, seconds, args, seed_corpus=False)
            print(route, "with", with_)
            routes[route] = {"without": without, "with": with_, "job": job}
    report = {
        "command": command_line(),
        "machine": machine(),
        "mix": {"zipf": args.zipf, "queries": args.queries, "seed": args.seed},
        "top_n": args.top_n,
        "healthz_ms": healthz,
        "routes": routes,
    }
    write_report(report, "precompute", markdown, output_dir(args))


if __name__ == "__main__":
    main()
