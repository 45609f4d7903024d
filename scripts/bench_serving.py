"""Serving benchmark: each model raw in-process, then the same models over HTTP through Serve.

    .venv/bin/python scripts/bench_serving.py [--config serve_config.yaml] [--duration 8]

Phase 1 loads each model with the deployment's own code (same precision and threads as its
replica) in a child process and measures throughput across batch sizes. Phase 2 starts a
private Ray cluster, deploys the config as `serve run` does, and drives closed-loop HTTP
clients at concurrency 1, 8 and 64, reading the executed batch sizes from /v1/status.
Writes docs/benchmarks/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.config import AppConfig, CacheConfig  # noqa: E402
from serve_app.launch import deploy, load_config, wait_ready  # noqa: E402

OUT = ROOT / "docs" / "benchmarks"
CONCURRENCY = (1, 8, 64)
CHAT_TOKENS = 64
CHAT_PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Describe, in detail, how bread is made.",
    "Explain how a steam engine works, step by step.",
    "Tell me about the history of the bicycle.",
]


def corpus_sentences(limit: int = 4096) -> list[str]:
    """Real English sentences of 8-40 words from the license texts every Debian system ships."""
    text = " ".join(
        p.read_text(errors="ignore")
        for p in sorted(Path("/usr/share/common-licenses").glob("*"))
        if p.is_file()
    )
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in sentences if 8 <= len(s.split()) <= 40][:limit]


# --- phase 1: raw, in process ---------------------------------------------------------------
# The raw limit is the model's own: no cache may answer.
NO_CACHE = CacheConfig(embedding_entries=0, response_entries=0)


def raw_result(unit: str, model, by_batch: dict[int, float]) -> dict:
    return {
        "unit": unit,
        "threads": model.info["threads"],
        "precision": model.precision,
        "by_batch": by_batch,
    }


def raw_embedder(args: dict, sentences: list[str]) -> dict:
    from deployments.embedder import Embedder

    config = AppConfig(**args)
    model = Embedder.func_or_class(config.embedder, config.model_cache_dir, NO_CACHE)
    texts = sentences[:1024]
    by_batch = {}
    for size in (1, 8, 16, 32, 64, 128):
        n = 128 if size == 1 else len(texts)
        start = time.perf_counter()
        for i in range(0, n, size):
            model._encode(texts[i : i + size])
        by_batch[size] = n / (time.perf_counter() - start)
    return raw_result("sentences/s", model, by_batch)


def raw_reranker(args: dict, sentences: list[str]) -> dict:
    from deployments.reranker import Reranker

    config = AppConfig(**args)
    model = Reranker.func_or_class(config.reranker, config.model_cache_dir, NO_CACHE)
    passages = sentences[:200]
    query = "What are the conditions for distributing modified copies?"
    by_batch = {}
    for size in (4, 20, 32, 64):
        pairs = [(query, p) for p in passages[: max(size, 40)]]
        start = time.perf_counter()
        done = 0
        while done < 80:
            model._score_sorted(pairs[:size])
            done += size
        by_batch[size] = done / (time.perf_counter() - start)
    return raw_result("pairs/s", model, by_batch)


def raw_generator(args: dict) -> dict:
    from deployments.generator import Generator
    from serve_app.contracts import GenerationRequest

    config = AppConfig(**args)
    model = Generator.func_or_class(config.generator, config.model_cache_dir)
    by_batch = {}
    for size in (1, 4, 8):
        sequences = [
            model._sequence(
                GenerationRequest(
                    messages=[{"role": "user", "content": CHAT_PROMPTS[i % 4]}],
                    max_tokens=CHAT_TOKENS,
                )
            )
            for i in range(size)
        ]
        start = time.perf_counter()
        model._admit(sequences)  # the replica's own prefill and decoding steps, minus Serve
        while model.state is not None:
            model._step()
        elapsed = time.perf_counter() - start
        by_batch[size] = sum(s.delta.completion_tokens for s in sequences) / elapsed
    return raw_result("tokens/s", model, by_batch)


def run_raw(args: dict, sentences: list[str]) -> dict:
    # Each model in a fresh process: its memory is returned before the next one loads, and
    # torch's thread setting cannot leak between them.
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name, fn, fn_args in (
        ("embedder", raw_embedder, (args, sentences)),
        ("reranker", raw_reranker, (args, sentences)),
        ("generator", raw_generator, (args,)),
    ):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results[name] = pool.submit(fn, *fn_args).result()
        best = max(results[name]["by_batch"].items(), key=lambda kv: kv[1])
        results[name]["best_batch"], results[name]["best"] = best
        print(f"raw {name}: {results[name]['by_batch']} ({results[name]['unit']})", flush=True)
    return results


# --- phase 2: over HTTP ---------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    path: str
    role: str  # the deployment whose batches this scenario fills
    unit: str
    duration_s: float

    def body(self, i: int, sentences: list[str]) -> dict:
        n = len(sentences)
        if self.name == "embed-1":
            return {"input": sentences[i % n]}
        if self.name == "embed-32":
            return {"input": [sentences[(i * 32 + k) % n] for k in range(32)]}
        if self.name == "rerank-20":
            return {
                "query": sentences[i % n],
                "documents": [sentences[(i + k * 7) % n] for k in range(20)],
            }
        return {
            "messages": [{"role": "user", "content": CHAT_PROMPTS[i % 4]}],
            "max_tokens": CHAT_TOKENS,
        }

    def items(self, body: dict, answer: dict) -> int:
        if self.name.startswith("embed"):
            return len(answer["data"])
        if self.name.startswith("rerank"):
            return len(answer["results"])
        return answer["usage"]["completion_tokens"]


@dataclass
class Result:
    scenario: str
    concurrency: int
    throughput: float
    unit: str
    requests: int
    errors: int
    unfinished: int
    p50_ms: float
    p99_ms: float
    mean_batch: float
    max_batch_size: int


async def closed_loop(
    base_url: str, scenario: Scenario, concurrency: int, sentences: list[str]
) -> tuple[float, list[float], int, int]:
    """`concurrency` clients, each sending its next request when the last is answered.

    New requests stop after `duration_s`; those still in flight get as long again to finish,
    then are cancelled and counted as unfinished (the time budget stays bounded even where
    one request takes seconds). Throughput counts finished work over the whole window.
    """
    latencies: list[float] = []
    items = errors = 0
    stop_at = time.perf_counter() + scenario.duration_s
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal items, errors
        while time.perf_counter() < stop_at:
            body = scenario.body(next(counter), sentences)
            start = time.perf_counter()
            async with session.post(base_url + scenario.path, json=body) as response:
                answer = await response.json()
            if response.status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            items += scenario.items(body, answer)

    timeout = aiohttp.ClientTimeout(total=None)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=2 * scenario.duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - start
    return items / elapsed, latencies, errors, len(pending)


def drain(base_url: str, scenario: Scenario, sentences: list[str], quiet_s: float = 2.0) -> None:
    """Wait until work cancelled by the last run has left the deployment.

    A probe request queues behind whatever is left; then the batch counters must stay still
    for `quiet_s` (sequences already decoding run on until their budget is spent).
    """
    httpx.post(base_url + scenario.path, json=scenario.body(0, sentences), timeout=600)
    role = scenario.role
    deadline = time.monotonic() + 120
    last = batch_counters(base_url, role)["batches"]["batches"]
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = batch_counters(base_url, role)["batches"]["batches"]
        if now == last:
            return
        last = now


def batch_counters(base_url: str, role: str) -> dict:
    return httpx.get(f"{base_url}/v1/status", timeout=30).json()["models"][role]


def run_http(config: dict, sentences: list[str], duration: float) -> list[Result]:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base_url = deploy(config)
    wait_ready(base_url)
    scenarios = [
        Scenario("embed-1", "/v1/embeddings", "embedder", "sentences/s", duration),
        Scenario("embed-32", "/v1/embeddings", "embedder", "sentences/s", duration),
        Scenario("rerank-20", "/v1/rerank", "reranker", "pairs/s", duration * 2),
        Scenario("chat-64", "/v1/chat/completions", "generator", "tokens/s", duration * 3),
    ]
    results = []
    try:
        for scenario in scenarios:
            warm = Scenario(scenario.name, scenario.path, scenario.role, scenario.unit, 2.0)
            asyncio.run(closed_loop(base_url, warm, 4, sentences[:64]))
            drain(base_url, scenario, sentences)
            for concurrency in CONCURRENCY:
                before = batch_counters(base_url, scenario.role)
                throughput, latencies, errors, unfinished = asyncio.run(
                    closed_loop(base_url, scenario, concurrency, sentences)
                )
                after = batch_counters(base_url, scenario.role)
                drain(base_url, scenario, sentences)
                batches = after["batches"]["batches"] - before["batches"]["batches"]
                items = after["batches"]["items"] - before["batches"]["items"]
                q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
                result = Result(
                    scenario=scenario.name,
                    concurrency=concurrency,
                    throughput=throughput,
                    unit=scenario.unit,
                    requests=len(latencies),
                    errors=errors,
                    unfinished=unfinished,
                    p50_ms=statistics.median(latencies) * 1000,
                    p99_ms=q[98] * 1000,
                    mean_batch=items / batches if batches else 0.0,
                    max_batch_size=after["batching"]["max_batch_size"],
                )
                results.append(result)
                print(
                    f"http {scenario.name} c={concurrency}: {throughput:.1f} {scenario.unit}, "
                    f"p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, "
                    f"mean batch {result.mean_batch:.1f}/{result.max_batch_size}, "
                    f"errors {errors}",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


# --- report -------------------------------------------------------------------------------
def targets(raw: dict, http: list[Result]) -> list[dict]:
    def find(name: str, c: int) -> Result:
        return next(r for r in http if r.scenario == name and r.concurrency == c)

    served32 = max(find("embed-32", c).throughput for c in CONCURRENCY)
    chat1, chat8 = find("chat-64", 1).throughput, find("chat-64", 8).throughput
    rows = [
        {
            "target": "served 32-input embeddings / raw in-process (best batch)",
            "goal": 0.85,
            "value": served32 / raw["embedder"]["best"],
        }
    ]
    for name in ("embed-32", "embed-1", "rerank-20", "chat-64"):
        r = find(name, CONCURRENCY[-1])
        rows.append(
            {
                "target": f"mean executed batch / max_batch_size, {name} at c={r.concurrency}",
                "goal": 0.75,
                "value": r.mean_batch / r.max_batch_size,
            }
        )
    rows.append(
        {"target": "chat tokens/s at 8 concurrent / 1 alone", "goal": 4.0, "value": chat8 / chat1}
    )
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; config `{report['config']}`; {report['date']}.",
        "One run on a shared, noisy machine: compare ratios within this table, not across runs.",
        "",
        "## Raw in-process (same code, precision and threads as the replica)",
        "",
        "| model | precision | threads | " + " | ".join(["batch: throughput"]) + " | best |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["raw"].items():
        by_batch = ", ".join(f"{b}: {v:.1f}" for b, v in r["by_batch"].items())
        lines.append(
            f"| {name} | {r['precision']} | {r['threads']} | {by_batch} | "
            f"{r['best']:.1f} {r['unit']} at {r['best_batch']} |"
        )
    lines += [
        "",
        "## Over HTTP (closed-loop clients on 127.0.0.1, same machine)",
        "",
        "| scenario | concurrency | throughput | p50 ms | p99 ms | mean executed batch "
        "| requests | errors | unfinished |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["http"]:
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {r['throughput']:.1f} {r['unit']} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['mean_batch']:.1f} / {r['max_batch_size']} | "
            f"{r['requests']} | {r['errors']} | {r['unfinished']} |"
        )
    lines += ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | >= {t['goal']} | {t['value']:.2f} | "
            f"{'yes' if t['value'] >= t['goal'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def render(path: Path) -> None:
    """Re-write the markdown (and targets) of a saved serving.json without re-measuring."""
    report = json.loads(path.read_text())
    http = [Result(**r) for r in report["http"]]
    report["targets"] = targets(report["raw"], http)
    path.write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per HTTP scenario")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--render", type=Path, help="only re-render this serving.json")
    options = parser.parse_args()
    if options.render:
        render(options.render)
        return

    config = load_config(ROOT / options.config)
    args = config["applications"][0].get("args", {})
    sentences = corpus_sentences()
    raw = run_raw(args, sentences)
    http = run_http(config, sentences, options.duration)
    report = {
        "command": "python scripts/bench_serving.py " + " ".join(sys.argv[1:]),
        "config": options.config,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, no GPU",
        "raw": raw,
        "http": [asdict(r) for r in http],
    }
    report["targets"] = targets(raw, http)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2))
    (out / "serving.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
