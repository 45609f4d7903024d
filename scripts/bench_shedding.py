"""Load shedding on the default config: what a fresh start, full routes and ten times that get.

    .venv/bin/python scripts/bench_shedding.py [--config serve_config.yaml] [--duration 20] \
        [--out docs/benchmarks] [--smoke]

Starts `serve run CONFIG` (its own Ray cluster; the script refuses to run while another one
is up), and measures three things against it:
- a fresh start: the first ingest, chat and RAG request sent the moment `/ready` turns 200;
- chat, RAG and ingest at once, each at its route's `max_running` clients, for --duration
  seconds: the load the config can serve, which should get no 503;
- the same with ten times the clients: which should be shed, fast, with `Retry-After`.

Each phase runs scripts/loadtest.py once per route, side by side (closed loops that wait out
`Retry-After`; RAG's corpus is stored before the first phase), and reads the routes' 503
counts by reason from `/v1/status` before and after.
While they run it samples the shedding readings, and the host CPU use that the former signal
(CPU above 90% averaged over 5 s) would have shed on. Writes OUT/shedding.json and .md.

--smoke: 3 s per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import httpx
import psutil
import yaml
from benchkit.cluster import config_url, ray_running, serve_run
from benchkit.corpus import license_sentences
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    machine,
    output_dir,
    write_report,
)
from benchkit.routeload import seed, seed_batches

ROUTES = ("chat", "rag", "ingest")
COLLECTION = "shedding"
FIRST = {
    "ingest": ("/v1/documents", {"collection": "fresh", "documents": [{"text": "First one."}]}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    "rag": ("/v1/rag/query", {"collection": "fresh", "query": "Which one?", "max_tokens": 16}),
}


def answer_code(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(response.status_code)


def first_requests(url: str) -> dict:
    """Each route's first request, sent the moment /ready is 200, one after the other."""
    out = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        shedding = client.get("/v1/status").json()["shedding"]
        for route, (path, body) in FIRST.items():
            start = time.perf_counter()
            response = client.post(path, json=body)
            out[route] = {
                "answer": answer_code(response),
                "seconds": round(time.perf_counter() - start, 2),
            }
    return {"requests": out, "shedding_at_ready": shedding}


class Sampler:
    """The shedding readings from /v1/status, and the host CPU averaged over 5 s as the
    former signal computed it, every 0.5 s while a phase runs."""

    def __init__(self, url: str) -> None:
        self.url, self.samples, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        cpu: deque[float] = deque(maxlen=10)
        psutil.cpu_percent(None)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.wait(0.5):
                cpu.append(psutil.cpu_percent(None))
                try:
                    shedding = client.get("/v1/status").json()["shedding"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                self.samples.append({"cpu_5s": sum(cpu) / len(cpu), **shedding})

    def summary(self) -> dict:
        def stats(key: str) -> dict:
            values = [s[key] for s in self.samples if s.get(key) is not None]
            if not values:
                return {}
            return {"mean": round(sum(values) / len(values), 1), "max": round(max(values), 1)}

        n = max(1, len(self.samples))
        return {
            "samples": len(self.samples),
            "cpu_5s_percent": stats("cpu_5s"),
            "former_signal_shedding_share": round(
                sum(s["cpu_5s"] > 90 for s in self.samples) / n, 3
            ),
            "cpu_stall_percent": stats("cpu_stall_percent"),
            "cpu_stalled_share": round(sum(bool(s["cpu_stalled"]) for s in self.samples) / n, 3),
            "memory_percent": stats("memory_percent"),
            "memory_stall_percent": stats("memory_stall_percent"),
        }


async def seed_corpus(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await seed(client, seed_batches(license_sentences(), COLLECTION))


def rejected(url: str) -> dict[str, dict[str, int]]:
    routes = httpx.get(f"{url}/v1/status", timeout=30).json()["routes"]
    return {route: dict(routes[route]["rejected"]) for route in ROUTES}


def phase(url: str, clients: dict[str, int], duration: float, out: Path) -> dict:
    """Every route of `clients` loaded at once; answers by status and 503s by reason."""
    before = rejected(url)
    sampler = Sampler(url)
    sampler.thread.start()
    procs = {
        route: subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "loadtest.py"),
                *("--url", url, "--route", route, "--steps", str(n)),
                *("--duration", str(duration), "--out", str(out), "--name", f"{route}-{n}"),
                *("--collection", COLLECTION, "--max-tokens", "32", "--no-seed"),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for route, n in clients.items()
    }
    for proc in procs.values():
        proc.wait()
    sampler.stop.set()
    sampler.thread.join()
    after = rejected(url)
    routes = {}
    for route, n in clients.items():
        step = json.loads((out / f"loadtest-{route}-{n}.json").read_text())["results"][0]
        shed = {
            reason: count - before[route].get(reason, 0)
            for reason, count in after[route].items()
            if count > before[route].get(reason, 0)
        }
        routes[route] = {"clients": n, **summarize(step), "shed_by_reason": shed}
    return {"routes": routes, "pressure": sampler.summary()}


def summarize(step: dict) -> dict:
    """The loadtest step's answers by status, and latency of the 200s and of the 503s."""
    keep = ("requests", "status", "ok_rps", "latency_ms", "missing_retry_after_503")
    return {k: step[k] for k in keep if k in step}


def markdown(report: dict) -> str:
    lines = [
        "# Load shedding on the default config",
        "",
        f"`{report['command']}` on `{report['config']}`, {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; /ready after {report['ready_s']} s.",
        "",
        "## The first requests after /ready",
        "",
        "| route | answer | seconds |",
        "|---|---|---|",
    ]
    fresh = report["fresh_start"]
    for route, r in fresh["requests"].items():
        lines.append(f"| {route} | {r['answer']} | {r['seconds']} |")
    at_ready = fresh["shedding_at_ready"]
    lines += [
        "",
        f"Readings at /ready: CPU stalls {at_ready.get('cpu_stall_percent')}%, memory "
        f"{at_ready.get('memory_percent')}%, memory stalls "
        f"{at_ready.get('memory_stall_percent')}%.",
    ]
    for name, title in (("limits", "At the route limits"), ("tenfold", "At ten times that")):
        data = report[name]
        p = data["pressure"]
        lines += [
            "",
            f"## {title} ({report['duration_s']:g} s, chat, RAG and ingest at once)",
            "",
            "| route | clients | answers by status | 503 by reason | p50 / p99 ms of 200s |"
            " p50 ms of 503s |",
            "|---|---|---|---|---|---|",
        ]
        for route, r in data["routes"].items():
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(r.get("status", {}).items()))
            shed = ", ".join(f"`{k}` {n}" for k, n in r["shed_by_reason"].items()) or "none"
            ok, refused = r["latency_ms"]["200"], r["latency_ms"]["503"]
            lines.append(
                f"| {route} | {r['clients']} | {statuses} | {shed} | {ok['p50']} / {ok['p99']} |"
                f" {refused['p50']} |"
            )
        lines += [
            "",
            f"CPU stalls (PSI, 5 s) mean {p['cpu_stall_percent'].get('mean')}% / max "
            f"{p['cpu_stall_percent'].get('max')}%, over the 80% threshold in "
            f"{p['cpu_stalled_share']:.0%} of samples; host CPU averaged over 5 s: mean "
            f"{p['cpu_5s_percent'].get('mean')}%, over the former 90% threshold in "
            f"{p['former_signal_shedding_share']:.0%} of samples; memory "
            f"{p['memory_percent'].get('max')}% at most.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    add_output_options(parser, "3 s per phase")
    options = parser.parse_args()
    if options.smoke:
        options.duration = 3.0
    if ray_running():
        sys.exit("A Ray cluster is already running here: stop it first (ray stop).")
    config = yaml.safe_load((ROOT / options.config).read_text())
    url = config_url(config)
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    limits = {r: ingress["user_config"]["routes"][r]["max_running"] for r in ROUTES}
    out = Path(tempfile.mkdtemp(prefix="rag-shedding-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    with serve_run(options.config, url, out / "serve.log", env) as ready:
        ready_s = round(ready, 1)
        fresh = first_requests(url)
        print(json.dumps(fresh), flush=True)
        # RAG's corpus, stored before the load: seeding during it would be a third ingest.
        asyncio.run(seed_corpus(url))
        at_limits = phase(url, limits, options.duration, out)
        print(json.dumps(at_limits), flush=True)
        tenfold = phase(url, {r: 10 * n for r, n in limits.items()}, options.duration, out)
        print(json.dumps(tenfold), flush=True)
    report = {
        "command": command_line(),
        "config": str(options.config),
        "machine": machine(),
        "ready_s": ready_s,
        "duration_s": options.duration,
        "fresh_start": fresh,
        "limits": at_limits,
        "tenfold": tenfold,
    }
    write_report(report, "shedding", markdown, output_dir(options))


if __name__ == "__main__":
    main()
