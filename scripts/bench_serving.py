"""Serving benchmark: each model raw in-process, then the same models over HTTP through Serve.

    .venv/bin/python scripts/bench_serving.py [--config serve_config.yaml] [--duration 8] \
        [--out docs/benchmarks] [--smoke]

Phase 1 loads each model through the engine API its deployment wraps (deployments/engines,
same device, precision and threads as its replica) in a child process and measures throughput
across batch sizes. Phase 2 starts a private Ray cluster, deploys the config as `serve run`
does with each model at one replica, and drives closed-loop HTTP clients at concurrency 1, 8
and 64, reading the executed batch sizes from /v1/status. No input is sent twice, so no cache
answers. Writes OUT/serving.json and serving.md.

--smoke: two batch sizes per model, one second per scenario at concurrency 1 and 4.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from benchkit import loadgen, models
from benchkit.cluster import in_process
from benchkit.corpus import Texts, license_sentences
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    output_dir,
    percentiles_ms,
    write_report,
)

from serve_app.config import AppConfig
from serve_app.launch import load_config

CHAT_TOKENS = 64
CHAT_PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Describe, in detail, how bread is made.",
    "Explain how a steam engine works, step by step.",
    "Tell me about the history of the bicycle.",
]
CHAT_IDS = itertools.count()  # numbers the chat prompts over HTTP: none is asked twice


@dataclass(frozen=True)
class Sizes:
    """How much a run measures: the full benchmark, or a smoke run of seconds."""

    concurrency: tuple[int, ...] = (1, 8, 64)
    embed_batches: tuple[int, ...] = (1, 8, 16, 32, 64, 128)
    embed_texts: int = 1024
    rerank_batches: tuple[int, ...] = (4, 20, 32, 64)
    rerank_pairs: int = 80
    chat_batches: tuple[int, ...] = (1, 4, 8)
    chat_tokens: int = CHAT_TOKENS


SMOKE = Sizes(
    concurrency=(1, 4),
    embed_batches=(1, 8),
    embed_texts=32,
    rerank_batches=(4,),
    rerank_pairs=8,
    chat_batches=(1, 2),
    chat_tokens=8,
)


# --- phase 1: raw, in process ---------------------------------------------------------------
def raw_result(unit: str, precision: str, by_batch: dict[int, float]) -> dict:
    import torch

    return {
        "unit": unit,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "by_batch": by_batch,
    }


def raw_embedder(args: dict, sentences: list[str], sizes: Sizes) -> dict:
    config = AppConfig(**args)
    model = models.embedding_model(config.embedder, config.model_cache_dir)
    texts = sentences[: sizes.embed_texts]
    by_batch = {}
    for size in sizes.embed_batches:
        n = min(128, len(texts)) if size == 1 else len(texts)
        start = time.perf_counter()
        for i in range(0, n, size):
            model.encode(texts[i : i + size])
        by_batch[size] = n / (time.perf_counter() - start)
    return raw_result("sentences/s", model.precision, by_batch)


def raw_reranker(args: dict, sentences: list[str], sizes: Sizes) -> dict:
    config = AppConfig(**args)
    scorer = models.scorer(config.reranker, config.model_cache_dir)
    passages = sentences[:200]
    query = "What are the conditions for distributing modified copies?"
    by_batch = {}
    for size in sizes.rerank_batches:
        pairs = [(query, p) for p in passages[: max(size, 40)]]
        start = time.perf_counter()
        done = 0
        while done < sizes.rerank_pairs:
            models.score_pairs(scorer, pairs[:size])
            done += size
        by_batch[size] = done / (time.perf_counter() - start)
    return raw_result("pairs/s", scorer.precision.precision, by_batch)


def raw_generator(args: dict, sizes: Sizes) -> dict:
    from serve_app.contracts import GenerationRequest

    config = AppConfig(**args)
    engine = models.generation_engine(config.generator, config.model_cache_dir)
    by_batch = {}
    for size in sizes.chat_batches:
        requests = [
            GenerationRequest(
                messages=[{"role": "user", "content": CHAT_PROMPTS[i % 4]}],
                max_tokens=sizes.chat_tokens,
            )
            for i in range(size)
        ]
        start = time.perf_counter()
        sequences, _ = models.decode(engine, requests)
        elapsed = time.perf_counter() - start
        by_batch[size] = sum(s.delta.completion_tokens for s in sequences) / elapsed
    return raw_result("tokens/s", engine.info()["precision"], by_batch)


def run_raw(args: dict, sentences: list[str], sizes: Sizes) -> dict:
    # Each model in a fresh process: its memory is returned before the next one loads, and
    # torch's thread setting cannot leak between them.
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name, fn, fn_args in (
        ("embedder", raw_embedder, (args, sentences, sizes)),
        ("reranker", raw_reranker, (args, sentences, sizes)),
        ("generator", raw_generator, (args, sizes)),
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
    chat_tokens: int = CHAT_TOKENS

    def bodies(self, texts: Texts):
        """Endless request bodies; every text and prompt is new, so no cache answers."""
        while True:
            if self.name == "embed-1":
                yield {"input": texts.next()}
            elif self.name == "embed-32":
                yield {"input": texts.take(32)}
            elif self.name == "rerank-20":
                yield {"query": texts.next(), "documents": texts.take(20)}
            else:
                n = next(CHAT_IDS)
                yield {
                    "messages": [{"role": "user", "content": f"{CHAT_PROMPTS[n % 4]} (#{n})"}],
                    "max_tokens": self.chat_tokens,
                }

    def items(self, status: int, content: bytes) -> int:
        """The work one answer holds: embeddings, scored pairs or completion tokens."""
        if status != 200:
            return 0
        answer = json.loads(content)
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
    latency_ms: dict
    mean_batch: float
    max_batch_size: int


async def measure(
    base_url: str, scenario: Scenario, concurrency: int, texts: Texts
) -> tuple[float, list[loadgen.Record]]:
    """Closed-loop clients for the scenario's duration: throughput of finished work over the
    whole window (requests in flight at the end are awaited and counted), and the records."""
    records: list[loadgen.Record] = []
    async with loadgen.session(base_url, concurrency, timeout_s=600) as session:
        t0 = time.perf_counter()
        window = await loadgen.closed_loop(
            session,
            scenario.path,
            scenario.bodies(texts),
            concurrency,
            records,
            t0,
            duration=scenario.duration_s,
            read=scenario.items,
        )
    elapsed = window.end - window.start
    return sum(r.detail or 0 for r in records) / elapsed, records


def drain(base_url: str, scenario: Scenario, texts: Texts, quiet_s: float = 2.0) -> None:
    """Wait until work left over from the last run has left the deployment.

    A probe request queues behind whatever is left; then the batch counters must stay still
    for `quiet_s` (sequences already decoding run on until their budget is spent).
    """
    body = next(scenario.bodies(texts))
    httpx.post(base_url + scenario.path, json=body, timeout=600)
    role = scenario.role
    deadline = time.monotonic() + 120
    last = batch_counters(base_url, role)["batches"]["batches"]
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = batch_counters(base_url, role)["batches"]["batches"]
        if now == last:
            return
        last = now


def one_replica(config: dict) -> list[dict]:
    """Each model deployment held at one replica. `/v1/status` reads one replica's batch
    counters, so a second replica (autoscaling adds one under load) would make the difference
    of two readings meaningless; one replica is also what the raw phase compares with."""
    deployments = config["applications"][0].get("deployments", [])
    return [
        {"name": d["name"], "num_replicas": 1, "autoscaling_config": None}
        for d in deployments
        if d["name"] in ("Embedder", "Reranker", "Generator")
    ]


def batch_counters(base_url: str, role: str) -> dict:
    return httpx.get(f"{base_url}/v1/status", timeout=30).json()["models"][role]


def run_http(config: dict, texts: Texts, duration: float, sizes: Sizes) -> list[Result]:
    scenarios = [
        Scenario("embed-1", "/v1/embeddings", "embedder", "sentences/s", duration),
        Scenario("embed-32", "/v1/embeddings", "embedder", "sentences/s", duration),
        Scenario("rerank-20", "/v1/rerank", "reranker", "pairs/s", duration * 2),
        Scenario(
            "chat-64",
            "/v1/chat/completions",
            "generator",
            "tokens/s",
            duration * 3,
            sizes.chat_tokens,
        ),
    ]
    results = []
    with in_process(config, overrides=one_replica(config)) as base_url:
        for scenario in scenarios:
            warm = Scenario(
                scenario.name, scenario.path, scenario.role, scenario.unit, min(2.0, duration)
            )
            asyncio.run(measure(base_url, warm, 4, texts))
            drain(base_url, scenario, texts)
            for concurrency in sizes.concurrency:
                before = batch_counters(base_url, scenario.role)
                throughput, records = asyncio.run(measure(base_url, scenario, concurrency, texts))
                after = batch_counters(base_url, scenario.role)
                drain(base_url, scenario, texts)
                batches = after["batches"]["batches"] - before["batches"]["batches"]
                items = after["batches"]["items"] - before["batches"]["items"]
                ok = [r.latency for r in records if r.status == "200"]
                result = Result(
                    scenario=scenario.name,
                    concurrency=concurrency,
                    throughput=throughput,
                    unit=scenario.unit,
                    requests=len(ok),
                    errors=len(records) - len(ok),
                    latency_ms=percentiles_ms(ok),
                    mean_batch=items / batches if batches else 0.0,
                    max_batch_size=after["batching"]["max_batch_size"],
                )
                results.append(result)
                print(
                    f"http {scenario.name} c={concurrency}: {throughput:.1f} {scenario.unit}, "
                    f"p50 {result.latency_ms['p50']} ms, p99 {result.latency_ms['p99']} ms, "
                    f"mean batch {result.mean_batch:.1f}/{result.max_batch_size}, "
                    f"errors {result.errors}",
                    flush=True,
                )
    return results


# --- report -------------------------------------------------------------------------------
def targets(raw: dict, http: list[Result]) -> list[dict]:
    concurrency = sorted({r.concurrency for r in http})

    def find(name: str, c: int) -> Result:
        return next(r for r in http if r.scenario == name and r.concurrency == c)

    served32 = max(find("embed-32", c).throughput for c in concurrency)
    chat1, chat_many = find("chat-64", 1).throughput, find("chat-64", concurrency[1]).throughput
    rows = [
        {
            "target": "served 32-input embeddings / raw in-process (best batch)",
            "goal": 0.85,
            "value": served32 / raw["embedder"]["best"],
        }
    ]
    for name in ("embed-32", "embed-1", "rerank-20", "chat-64"):
        r = find(name, concurrency[-1])
        rows.append(
            {
                "target": f"mean executed batch / max_batch_size, {name} at c={r.concurrency}",
                "goal": 0.75,
                "value": r.mean_batch / r.max_batch_size,
            }
        )
    rows.append(
        {
            "target": f"chat tokens/s at {concurrency[1]} concurrent / 1 alone",
            "goal": 4.0 * concurrency[1] / 8,
            "value": chat_many / chat1 if chat1 else 0.0,
        }
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
        "| requests | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["http"]:
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {r['throughput']:.1f} {r['unit']} | "
            f"{r['latency_ms']['p50']} | {r['latency_ms']['p99']} | "
            f"{r['mean_batch']:.1f} / {r['max_batch_size']} | {r['requests']} | {r['errors']} |"
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
    write_report(report, path.stem, markdown, path.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per HTTP scenario")
    parser.add_argument("--render", type=Path, help="only re-render this serving.json")
    add_output_options(parser, "two batch sizes per model, 1 s per scenario at 1 and 4 clients")
    options = parser.parse_args()
    if options.render:
        render(options.render)
        return
    sizes = SMOKE if options.smoke else Sizes()
    duration = 1.0 if options.smoke else options.duration

    config = load_config(ROOT / options.config)
    args = config["applications"][0].get("args", {})
    sentences = license_sentences()
    raw = run_raw(args, sentences, sizes)
    http = run_http(config, Texts(sentences), duration, sizes)
    report = {
        "command": command_line(),
        "config": options.config,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, no GPU",
        "raw": raw,
        "http": [asdict(r) for r in http],
    }
    report["targets"] = targets(raw, http)
    write_report(report, "serving", markdown, output_dir(options))


if __name__ == "__main__":
    main()
