"""Batch size sweeps per model on this device, and the batch size each should run at.

    .venv/bin/python scripts/bench_batch.py [--models embedder,reranker,generator]
        [--precision auto] [--threads 2] [--device auto] [--seconds 6] [--smoke]
        [--config serve_config.yaml] [--out-name batch] [--out docs/benchmarks]

Each model runs in a fresh child process, in one precision (--precision; `auto`: what `auto`
recorded on this machine in precision-choices.json, else bf16 where the CPU has native bf16
(AVX512-BF16 or AMX), fp16 on CUDA, else fp32), with --threads torch threads. Sweeps:

- embedder (all-MiniLM-L6-v2): sentences in one forward pass, 1..128 (`encode(batch,
  batch_size=len(batch))`), random 10-40-word man page sentences; then sentences per forward
  inside one 128-sentence batch (`encode(128, batch_size=k)`: sentence-transformers sorts the
  batch by length first, as the Embedder deployment does with SENTENCES_PER_FORWARD); then the
  token bound: throughput and peak memory of 16-32 sentences cut to 64-256 tokens (1k-8k tokens
  per batch, against the deployment's max_batch_tokens);
- reranker (QueryLikelihood over SmolLM2-135M-Instruct): (query, ~400-character passage) pairs
  in one forward pass, 1..64 (`QueryLikelihood.score`);
- generator (SmolLM2-135M-Instruct): concurrent sequences 1..16 decoding together through the
  Generator's engine (`deployments.engines.hf.TransformersEngine`): one left-padded prefill,
  then one step for all of them (greedy; a step's latency counts while the batch is full).

Per point: throughput, p50 latency of one batch (one decode step for the generator: each
sequence's latency per token), and peak memory over the point: RSS peak above the RSS at its
start (freed memory handed back first with malloc_trim, the peak reset through
/proc/self/clear_refs), or on CUDA torch's max allocated above allocated. A point runs a
warm-up batch, then batches for --seconds (at least 3; 2 rounds for the generator).

Recommendation: the smallest batch size reaching >= 90% of the sweep's best throughput (lower
latency and memory at nearly peak throughput), compared with serve_config.yaml's
`deployments[].user_config.max_batch_size` and the code's SENTENCES_PER_FORWARD /
PAIRS_PER_FORWARD. Writes OUT/OUT_NAME.json, OUT_NAME.md and OUT_NAME.png. Does not start
Ray. --smoke: two points per sweep, 1 s each.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit.child import WORKER_FLAG, run_worker
from benchkit.corpus import build_data
from benchkit.measure import (
    auto_device,
    cpu_share,
    fmt,
    mb,
    model_cache_dir,
    peak_rss_bytes,
    process_cpu_s,
    reset_peak_rss,
    rss_bytes,
    sync,
)
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    machine,
    machine_line,
    output_dir,
    write_report,
)

MODELS = ("embedder", "reranker", "generator")
DEPLOYMENTS = {"embedder": "Embedder", "reranker": "Reranker", "generator": "Generator"}
SIZES = {
    "embedder": (1, 4, 8, 16, 32, 64, 128),
    "per_forward": (1, 4, 8, 16, 32, 64, 128),
    "reranker": (1, 2, 4, 8, 16, 32, 64),
    "generator": (1, 2, 4, 8, 16),
}
SMOKE_SIZES = {
    "embedder": (1, 8),
    "per_forward": (4, 16),
    "reranker": (1, 4),
    "generator": (1, 4),
}
PER_FORWARD_BATCH = 128  # sentences of the batch cut into forward passes
TOKEN_POINTS = ((16, 64), (16, 128), (16, 256), (32, 256))  # (sentences, tokens each)
SMOKE_TOKEN_POINTS = ((16, 64),)
DECODE_STEPS = 32
NEAR_BEST = 0.9
UNITS = {
    "embedder": "sentences/s",
    "per_forward": "sentences/s",
    "tokens": "tokens/s",
    "reranker": "pairs/s",
    "generator": "tokens/s",
}


# --- memory of one point ----------------------------------------------------------------------
def malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Point:
    """Times batches of one sweep point and the memory it takes above where it started."""

    def __init__(self, device: str, threads: int, seconds: float, min_batches: int) -> None:
        import torch

        self.torch, self.device, self.threads = torch, device, threads
        self.seconds, self.min_batches = seconds, min_batches
        self.times: list[float] = []

    def __enter__(self) -> Point:
        gc.collect()
        malloc_trim()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            self.gpu0 = self.torch.cuda.memory_allocated()
        self.rss0 = rss_bytes()
        reset_peak_rss()
        self.cpu0 = process_cpu_s()
        self.wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = peak_rss_bytes() - self.rss0
        self.gpu_peak = (
            self.torch.cuda.max_memory_allocated() - self.gpu0 if self.device == "cuda" else None
        )
        self.cpu = cpu_share(
            process_cpu_s() - self.cpu0, time.perf_counter() - self.wall0, self.threads
        )

    def more(self) -> bool:
        """Whether to run another timed batch."""
        return len(self.times) < self.min_batches or sum(self.times) < self.seconds

    def timed(self, fn, *args):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        return out

    def result(self, size: int, items: int, **extra: Any) -> dict:
        total = sum(self.times)
        return {
            "size": size,
            "batches": len(self.times),
            "items": items,
            "throughput": items / total if total else None,
            "p50_ms": statistics.median(self.times) * 1000 if self.times else None,
            "peak_mb": mb(self.peak),
            "gpu_peak_mb": mb(self.gpu_peak),
            "cpu_share": self.cpu,
            **extra,
        }


# --- the child process: one model's sweeps ----------------------------------------------------
def worker(spec: dict, result_path: Path) -> None:
    import torch

    from deployments.engines import loading

    loading.set_threads(spec["threads"])
    data = json.loads(Path(spec["data"]).read_text())
    sweep = {"embedder": sweep_embedder, "reranker": sweep_reranker, "generator": sweep_generator}
    start = time.perf_counter()
    out = sweep[spec["model"]](spec, data, torch, loading)
    out.update(
        {
            "model": spec["model"],
            "precision": spec["precision"],
            "threads": torch.get_num_threads(),
            "rss_loaded_mb": mb(rss_bytes()),
            "total_s": round(time.perf_counter() - start, 1),
        }
    )
    result_path.write_text(json.dumps(out))


def cycle(items: list, start: int, n: int) -> list:
    return [items[(start + k) % len(items)] for k in range(n)]


def sweep_embedder(spec: dict, data: dict, torch, loading) -> dict:
    from deployments.engines import embedding
    from serve_app.config import DEFAULT_EMBEDDING_MODEL

    device, mode = spec["device"], spec["precision"]
    path = loading.local_path(DEFAULT_EMBEDDING_MODEL)
    model = embedding.load_model(path, mode, device)  # as the Embedder loads it
    sentences = data["sentences"]

    def encode(texts: list[str], per_forward: int):
        return embedding.encode(model, texts, per_forward)

    def padded_tokens(texts: list[str]) -> int:
        lengths = [min(len(ids), model.max_seq_length) for ids in tokenize(texts)]
        return len(texts) * max(lengths)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return model.tokenizer(texts)["input_ids"]

    encode(sentences[:32], 32)  # load-time warm-up (pages in the weights)
    args = (device, spec["threads"], spec["seconds"], 3)
    points, cursor = [], 0
    for size in spec["sizes"]["embedder"]:
        encode(cycle(sentences, cursor, size), size)  # this shape's warm-up
        with Point(*args) as point:
            tokens = []
            while point.more():
                batch = cycle(sentences, cursor, size)
                cursor += size
                point.timed(encode, batch, size)
                tokens.append(padded_tokens(batch))
        points.append(point.result(size, size * len(point.times), tokens=statistics.mean(tokens)))
        print(f"embedder batch {size}: {points[-1]['throughput']:.1f} sentences/s", flush=True)
    per_forward = []
    for size in spec["sizes"]["per_forward"]:
        encode(cycle(sentences, cursor, PER_FORWARD_BATCH), size)
        with Point(*args) as point:
            while point.more():
                batch = cycle(sentences, cursor, PER_FORWARD_BATCH)
                cursor += PER_FORWARD_BATCH
                point.timed(encode, batch, size)
        per_forward.append(point.result(size, PER_FORWARD_BATCH * len(point.times)))
        print(f"embedder per forward {size}: {per_forward[-1]['throughput']:.1f}", flush=True)
    # Token bound: sentences joined and cut to exactly `length` tokens each.
    long_text = " ".join(sentences[:400])
    ids = model.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    token_points = []
    for count, length in spec["token_points"]:
        texts = [
            model.tokenizer.decode(ids[k * length : (k + 1) * length - 2]) for k in range(count)
        ]
        real = sum(len(t) for t in tokenize(texts))
        encode(texts, count)
        with Point(*args) as point:
            while point.more():
                point.timed(encode, texts, count)
        row = point.result(count, count * len(point.times), tokens=real)
        row["tokens_per_s"] = real * len(point.times) / sum(point.times)
        row["length"] = length
        token_points.append(row)
        print(f"embedder {count}x{length} tokens: {row['tokens_per_s']:.0f} tokens/s", flush=True)
    return {
        "points": points,
        "per_forward": per_forward,
        "token_points": token_points,
        "max_seq_length": model.max_seq_length,
    }


def sweep_reranker(spec: dict, data: dict, torch, loading) -> dict:
    from deployments.engines.scoring import QueryLikelihood
    from serve_app.config import RerankerConfig

    scorer = QueryLikelihood(
        RerankerConfig(precision=spec["precision"]), model_cache_dir(), spec["device"]
    )
    pairs = [(s["query"], p) for s in data["rerank"] for p in s["passages"]]
    scorer.score(pairs[:4])  # load-time warm-up
    args = (spec["device"], spec["threads"], spec["seconds"], 3)
    points, cursor = [], 0
    for size in spec["sizes"]["reranker"]:
        scorer.score(cycle(pairs, cursor, size))  # this shape's warm-up
        with Point(*args) as point:
            tokens = []
            while point.more():
                batch = cycle(pairs, cursor, size)
                cursor += size
                scored = point.timed(scorer.score, batch)
                tokens.append(len(batch) * max(t for _, t in scored))
        points.append(point.result(size, size * len(point.times), tokens=statistics.mean(tokens)))
        print(f"reranker {size}: {points[-1]['throughput']:.1f} pairs/s", flush=True)
    return {"points": points}


def sweep_generator(spec: dict, data: dict, torch, loading) -> dict:
    """Concurrent sequences through the Generator's engine (`TransformersEngine`): one
    prefill (`add`), then one `step` for all in flight, as the deployment's loop runs it."""
    from deployments.engines.hf import TransformersEngine
    from serve_app.config import GeneratorConfig
    from serve_app.contracts import GenerationRequest

    device, cache_dir = spec["device"], model_cache_dir()
    config = GeneratorConfig(precision=spec["precision"])
    tokenizer = loading.load_tokenizer(config, cache_dir)
    model = loading.load_causal_lm(config, cache_dir, device, spec["precision"])
    engine = TransformersEngine.from_model(tokenizer, model, device)  # warms up
    steps = spec["decode_steps"]
    requests = [
        GenerationRequest(messages=[{"role": "user", "content": p}], max_tokens=steps)
        for p in data["prompts"]
    ]

    def decode(batch: list) -> tuple[float, list[float], float, int]:
        """Prefill seconds, each full step's ms (every sequence still in flight), decoding
        seconds and tokens generated."""
        sequences = [engine.sequence(r) for r in batch]
        sync(device)
        start = time.perf_counter()
        engine.add(sequences)
        sync(device)
        prefill = time.perf_counter() - start
        full_steps = []
        decode_start = time.perf_counter()
        while engine.in_flight():
            full = len(engine.in_flight()) == len(batch)
            begin = time.perf_counter()
            engine.step()
            sync(device)
            if full:
                full_steps.append((time.perf_counter() - begin) * 1000)
        tokens = sum(s.delta.completion_tokens for s in sequences if s.delta is not None)
        return prefill, full_steps, time.perf_counter() - decode_start, tokens

    args = (device, spec["threads"], spec["seconds"], 2)
    points, cursor = [], 0
    for size in spec["sizes"]["generator"]:
        decode(cycle(requests, cursor, size))  # this shape's warm-up
        prefills, steps_ms, tokens = [], [], 0
        with Point(*args) as point:
            while point.more():
                batch = cycle(requests, cursor, size)
                cursor += size
                prefill, full_steps, seconds, generated = decode(batch)
                prefills.append(prefill)
                steps_ms += full_steps
                point.times.append(seconds)
                tokens += generated
        row = point.result(size, tokens)
        row.update(
            {
                # one decode step of the full batch: each sequence's latency per token
                "p50_ms": statistics.median(steps_ms) if steps_ms else None,
                "p90_step_ms": sorted(steps_ms)[int(0.9 * (len(steps_ms) - 1))]
                if steps_ms
                else None,
                "prefill_p50_ms": statistics.median(prefills) * 1000,
                "rounds": len(point.times),
            }
        )
        points.append(row)
        print(f"generator {size}: {row['throughput']:.1f} tokens/s", flush=True)
    return {"points": points, "decode_steps": steps}


# --- the parent -------------------------------------------------------------------------------
def default_precision(model: str, device: str, threads: int) -> tuple[str, str]:
    """What `auto` picked for `model` here, as recorded; else the usual winner on this device."""
    from deployments.engines import precision as precision_
    from serve_app.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_GENERATION_MODEL

    path = model_cache_dir() / "precision-choices.json"
    entries: dict = {}
    with contextlib.suppress(OSError, ValueError):
        entries = json.loads(path.read_text())
    if model == "embedder":
        prefix = f"sentence-transformer|{DEFAULT_EMBEDDING_MODEL}|"
    else:
        prefix = f"causal-lm|{DEFAULT_GENERATION_MODEL}|"
    import torch

    torch.set_num_threads(threads)
    exact = prefix + precision_.device_signature(device)
    if isinstance(entries.get(exact), dict):
        return entries[exact]["precision"], f"auto's recorded choice ({exact})"
    near = [k for k in entries if k.startswith(prefix + device + ":")]
    if near:
        why = f"auto's recorded choice at other settings ({near[0]})"
        return entries[near[0]]["precision"], why
    if device == "cuda":
        return "fp16", "no recorded auto choice; fp16 on CUDA"
    flags = set(machine(device, threads)["cpu_flags"])
    if {"avx512_bf16", "amx_bf16"} & flags:
        return "bf16", "no recorded auto choice; bf16: the CPU has native bf16"
    return "fp32", "no recorded auto choice; fp32: the CPU has no native bf16"


def configured(config_path: Path) -> dict:
    """Per model: the serve config's max_batch_size / max_batch_tokens and threads, and the
    per-forward constants in the code."""
    import yaml

    from deployments.engines.embedding import SENTENCES_PER_FORWARD
    from deployments.engines.scoring import PAIRS_PER_FORWARD
    from serve_app.config import EmbedderConfig, GeneratorConfig, RerankerConfig

    app = (yaml.safe_load(config_path.read_text())["applications"] or [{}])[0]
    users = {d["name"]: d.get("user_config") or {} for d in app.get("deployments", [])}
    defaults = {"embedder": EmbedderConfig(), "reranker": RerankerConfig()}
    defaults["generator"] = GeneratorConfig()
    out = {}
    for model, name in DEPLOYMENTS.items():
        user = users.get(name, {})
        batching = defaults[model].batching
        out[model] = {
            "max_batch_size": user.get("max_batch_size", batching.max_batch_size),
            "max_batch_tokens": user.get("max_batch_tokens", batching.max_batch_tokens),
            "threads": (app.get("args", {}).get(model) or {}).get("threads"),
        }
    out["embedder"]["sentences_per_forward"] = SENTENCES_PER_FORWARD
    out["reranker"]["pairs_per_forward"] = PAIRS_PER_FORWARD
    return out


def recommend(points: list[dict]) -> dict | None:
    """The smallest size reaching NEAR_BEST of the best throughput."""
    rated = [p for p in points if p.get("throughput")]
    if not rated:
        return None
    best = max(rated, key=lambda p: p["throughput"])
    pick = min(
        (p for p in rated if p["throughput"] >= NEAR_BEST * best["throughput"]),
        key=lambda p: p["size"],
    )
    return {
        "size": pick["size"],
        "throughput": pick["throughput"],
        "best_size": best["size"],
        "best_throughput": best["throughput"],
    }


def run(options: argparse.Namespace) -> dict:
    device = auto_device(options.device)
    config = configured(Path(options.config))
    print("building the data from /usr/share/man ...", flush=True)
    data = build_data(1000, 40, 48, options.seed, options.pages)
    report: dict[str, Any] = {
        "settings": {
            "command": command_line(),
            "models": options.models,
            "threads": options.threads,
            "seconds": options.seconds,
            "config": options.config,
            "smoke": options.smoke,
            "near_best": NEAR_BEST,
            "seed": options.seed,
        },
        "machine": machine(device, options.threads),
        "configured": config,
        "models": {},
    }
    sizes = SMOKE_SIZES if options.smoke else SIZES
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        (work / "data.json").write_text(json.dumps(data))
        for model in options.models:
            if options.precision == "auto":
                mode, why = default_precision(model, device, options.threads)
            else:
                mode, why = options.precision, "--precision"
            print(f"{model} ({mode}: {why}) ...", flush=True)
            spec = {
                "model": model,
                "precision": mode,
                "device": device,
                "threads": options.threads,
                "seconds": options.seconds,
                "data": str(work / "data.json"),
                "sizes": sizes,
                "token_points": SMOKE_TOKEN_POINTS if options.smoke else TOKEN_POINTS,
                "decode_steps": 8 if options.smoke else DECODE_STEPS,
            }
            result, error = run_worker(__file__, spec, model, work, timeout_s=1800, echo=True)
            if result is None:
                print(f"  {error}", flush=True)
                report["models"][model] = {"precision": mode, "why": why, "error": error}
                continue
            result["why"] = why
            result["recommended"] = recommend(result["points"])
            if model == "embedder":
                result["recommended_per_forward"] = recommend(result["per_forward"])
            report["models"][model] = result
    return report


# --- report -----------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    s, m, conf = report["settings"], report["machine"], report["configured"]
    lines = [
        "# Batch sizes per model",
        "",
        f"Reproduce: `{s['command']}`  ",
        f"Machine: {machine_line(m)}.  ",
        "One run on a shared machine: compare points within a sweep, not across runs.",
        "",
        f"Each point: a warm-up batch, then batches for {s['seconds']:g} s (at least 3; the "
        "generator at least 2 rounds of prefill + decode). Throughput is items over the timed "
        "batches; p50 is one batch (the generator: one decode step, i.e. each sequence's "
        "latency per token); peak MB is the process's RSS peak above its RSS at the point's "
        "start (CUDA: max allocated above allocated); CPU share: CPU time / (wall x threads), "
        "well below 1 when other work held the cores.",
        "",
        f"**Rule**: recommend the smallest batch size reaching >= {NEAR_BEST:.0%} of the "
        "sweep's best throughput: nearly the peak rate, at lower latency and memory.",
        "",
        f"The serve config ({s['config']}) runs model replicas with threads "
        + ", ".join(f"{k} {v['threads']}" for k, v in conf.items())
        + f"; these sweeps ran with {s['threads']}.",
        "",
        "## Recommendations",
        "",
        "| model | precision | knob | recommended | throughput there | best (size) | configured |",
        "|---|---|---|---|---|---|---|",
    ]
    knobs = {
        "embedder": "sentences in one forward pass",
        "reranker": "pairs in one forward pass",
        "generator": "concurrent sequences",
    }
    for model, r in report["models"].items():
        if "error" in r:
            lines.append(f"| {model} | {r['precision']} | failed: {r['error'][-200:]} |||||")
            continue
        c = conf[model]
        if model == "embedder":
            spf = f"SENTENCES_PER_FORWARD {c['sentences_per_forward']['cpu']} (CPU)"
            rows = [
                (knobs[model], r["recommended"], f"max_batch_size {c['max_batch_size']}; {spf}"),
                (
                    f"sentences per forward in a {PER_FORWARD_BATCH}-sentence batch",
                    r["recommended_per_forward"],
                    spf,
                ),
            ]
        elif model == "reranker":
            have = f"PAIRS_PER_FORWARD {c['pairs_per_forward']}; "
            have += f"max_batch_size {c['max_batch_size']}"
            rows = [(knobs[model], r["recommended"], have)]
        else:
            rows = [(knobs[model], r["recommended"], f"max_batch_size {c['max_batch_size']}")]
        for knob, rec, have in rows:
            if rec is None:
                continue
            lines.append(
                f"| {model} | {r['precision']} | {knob} | **{rec['size']}** | "
                f"{rec['throughput']:.1f} {UNITS[model]} | {rec['best_throughput']:.1f} "
                f"({rec['best_size']}) | {have} |"
            )
    lines += [
        "",
        "How to read it against the config: the embedder's and reranker's `max_batch_size` "
        "count items per Serve batch, which the deployment cuts into forward passes of "
        "SENTENCES_PER_FORWARD / PAIRS_PER_FORWARD (and bounds by max_batch_tokens), so the "
        "per-forward sweeps speak to those constants and a `max_batch_size` of a few forward "
        "passes keeps the cores busy while more requests queue. The generator's "
        "`max_batch_size` is the sequences decoding together.",
    ]
    for model, r in report["models"].items():
        if "error" in r:
            continue
        lines += ["", f"## {model} ({r['precision']}: {r['why']})", ""]
        sweeps = [("points", knobs[model])]
        if model == "embedder":
            sweeps.append(
                ("per_forward", f"sentences per forward in a {PER_FORWARD_BATCH}-sentence batch")
            )
        for key, title in sweeps:
            gen = model == "generator"
            lines += [
                f"### {title}",
                "",
                "| size | "
                + UNITS[model]
                + " | p50 ms "
                + ("per step (per token) | p90 step ms | prefill p50 ms" if gen else "per batch")
                + " | peak MB | "
                + ("tokens per batch (padded) | " if key == "points" and not gen else "")
                + "CPU share | batches |",
                "|" + "---|" * (8 if gen else (7 if key == "points" else 6)),
            ]
            for p in r[key]:
                memory = p["gpu_peak_mb"] if p.get("gpu_peak_mb") is not None else p["peak_mb"]
                cells = [str(p["size"]), fmt(p["throughput"]), fmt(p["p50_ms"])]
                if gen:
                    cells += [fmt(p["p90_step_ms"]), fmt(p["prefill_p50_ms"])]
                cells.append(fmt(memory))
                if key == "points" and not gen:
                    cells.append(fmt(float(p["tokens"]), 0))
                cells += [fmt(p["cpu_share"], 2), str(p.get("rounds", p["batches"]))]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        if model == "embedder" and r.get("token_points"):
            bound = conf["embedder"]["max_batch_tokens"]
            lines += [
                "### token bound: sentences cut to a fixed length",
                "",
                f"max_seq_length {r['max_seq_length']}; the Embedder's max_batch_tokens is "
                f"{bound}.",
                "",
                "| sentences x tokens | tokens per batch | tokens/s | p50 ms | peak MB | "
                "peak KB per token | CPU share |",
                "|---|---|---|---|---|---|---|",
            ]
            for p in r["token_points"]:
                memory = p["gpu_peak_mb"] if p.get("gpu_peak_mb") is not None else p["peak_mb"]
                per_token = memory * 1024 / p["tokens"] if memory is not None else None
                lines.append(
                    f"| {p['size']} x {p['length']} | {p['tokens']} | {p['tokens_per_s']:.0f} | "
                    f"{fmt(p['p50_ms'])} | {fmt(memory)} | {fmt(per_token, 1)} | "
                    f"{fmt(p['cpu_share'], 2)} |"
                )
            biggest = max(r["token_points"], key=lambda p: p["tokens"])
            memory = biggest["gpu_peak_mb"] or biggest["peak_mb"]
            if memory:
                lines += [
                    "",
                    f"At {bound} tokens per batch (max_batch_tokens), extrapolating the largest "
                    f"point linearly: about {memory * bound / biggest['tokens']:.0f} MB of "
                    "activations per batch.",
                ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, r in report["models"].items() if "error" not in r]
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    conf = report["configured"]
    for col, model in enumerate(models):
        r = report["models"][model]
        top, bottom = axes[0][col], axes[1][col]
        first = "one decode step, all sequences" if model == "generator" else "batch = one forward"
        sweeps = [("points", first)]
        twin = bottom.twinx()
        if model == "embedder":
            sweeps.append(("per_forward", f"per forward, {PER_FORWARD_BATCH}-sentence batch"))
        for k, (key, label) in enumerate(sweeps):
            xs = [p["size"] for p in r[key]]
            top.plot(xs, [p["throughput"] for p in r[key]], "o-", color=f"C{k}", label=label)
            bottom.plot(xs, [p["p50_ms"] for p in r[key]], "o-", color=f"C{k}", label=label)
            memory = [
                p["gpu_peak_mb"] if p.get("gpu_peak_mb") is not None else p["peak_mb"]
                for p in r[key]
            ]
            twin.plot(xs, memory, "s--", color=f"C{k}", alpha=0.5, label=f"peak MB, {label}")
            twin.set_ylabel("peak MB above start (dashed)", fontsize=8)
        rec = r["recommended"]
        if rec:
            top.axhline(NEAR_BEST * rec["best_throughput"], color="grey", ls=":", lw=1)
            top.axvline(rec["size"], color="C2", ls="--", lw=1, label=f"recommended {rec['size']}")
        have = conf[model].get("pairs_per_forward") or conf[model]["max_batch_size"]
        if model == "embedder":
            spf = conf[model]["sentences_per_forward"]["cpu"]
            top.axvline(spf, color="C4", ls=":", lw=1, label=f"SENTENCES_PER_FORWARD {spf}")
        name = "PAIRS_PER_FORWARD" if model == "reranker" else "max_batch_size"
        top.axvline(have, color="C3", ls="-.", lw=1, label=f"configured {name} {have}")
        top.set_title(f"{model} ({r['precision']}): {UNITS[model]}", fontsize=10)
        bottom.set_title(
            "p50 ms per decode step" if model == "generator" else "p50 ms per batch",
            fontsize=10,
        )
        sizes = sorted({p["size"] for key, _ in sweeps for p in r[key]})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(x) for x in sizes])
            ax.set_xlabel("concurrent sequences" if model == "generator" else "batch size")
        top.legend(fontsize=7)
        if model == "embedder":
            bottom.legend(fontsize=7, loc="upper left")
    m = report["machine"]
    fig.suptitle(
        f"Batch size sweeps on {m['device']}: {m['cpu']}, {m['cores']} cores, "
        f"{m['threads']} torch threads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == WORKER_FLAG:
        worker(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="any of " + ",".join(MODELS))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16", "int8", "bnb-int8", "bnb-nf4"),
        help="auto: what auto recorded here, else bf16 on a CPU with native bf16, else fp32",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per point")
    parser.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    parser.add_argument("--pages", type=int, help="man pages to read (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-name", default="batch", help="OUT/NAME.*")
    add_output_options(parser, "two points per sweep, 1 s each")
    options = parser.parse_args()
    options.models = [m.strip() for m in options.models.split(",") if m.strip()]
    if set(options.models) - set(MODELS) or not options.models:
        parser.error(f"--models: choose from {','.join(MODELS)}")
    if options.smoke:
        options.seconds = min(options.seconds, 1.0)
        options.pages = options.pages or 400
    write_report(run(options), options.out_name, markdown, output_dir(options), plot)


if __name__ == "__main__":
    main()
