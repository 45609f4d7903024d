"""Precision modes side by side, per model: weights, process memory, raw throughput, and how
closely each mode's outputs follow fp32's on the same inputs.

    .venv/bin/python scripts/bench_precision.py [--models embedder,reranker,generator]
        [--precisions fp32,bf16,fp16,int8] [--sentences 1000] [--queries 100] [--prompts 48]
        [--threads 2] [--device auto] [--max-seconds 30] [--out-name precision] \
        [--out docs/benchmarks] [--smoke]

Models, loaded the way their deployments load them (deployments/precision.py applies the mode):
- embedder: all-MiniLM-L6-v2 (bundled), `model.encode(batch_size=32)` on chunks of 256
  sentences (sentence-transformers sorts each call by length before cutting its batches);
- reranker: `QueryLikelihood` (exp mean log P(query | passage)) over SmolLM2-135M-Instruct,
  pairs scored as the Reranker deployment does: by passage length, PAIRS_PER_FORWARD a pass;
- generator: SmolLM2-135M-Instruct, `model.generate(do_sample=False, max_new_tokens=32)` on
  left-padded batches of 8 chat prompts, with its KV cache.

Precisions: every mode that runs on the device (CPU: fp32, bf16, fp16, int8; CUDA: fp32, fp16,
bf16, bnb-int8, bnb-nf4); `precision.check` tells which are skipped and why. Each (model,
precision) runs in a fresh child process, so its RSS is its own: RSS after the imports, after
loading (and one warm-up pass, which also pages in mmap-ed weights), and the peak during the
timed pass (Linux VmHWM, reset after the warm-up); on CUDA also torch's allocated and peak bytes.

Bounded time: a timed pass stops after the unit of work (an encode call, a forward pass of
pairs, a generate batch) during which it passes --max-seconds (fp16 on a CPU without native fp16
is many times slower than the rest). fp32, the reference, always runs, last, on as many inputs
as the furthest other mode finished (every input when one finished them all), within
3x --max-seconds. Throughput is over what a mode finished, accuracy over the inputs it and fp32
both finished (the `compared` column).

Accuracy against fp32 on the same inputs: embeddings' mean and min cosine; rerank scores'
Spearman over all pairs and per query (mean), top-1 agreement (the passage ranked first is
fp32's); generations' exact-match rate. Each child also runs `auto`'s own check on
deployments/calibration.txt (mean cosine; next-token top-1 agreement), so the report can apply
auto's rule: the fastest candidate whose check passes.

Data, fixed by --seed, from this machine's man pages (`benchkit.corpus.build_data`):
distinct 10-40-word sentences; queries = a page's NAME description, each with 10 passages (the
first ~400 characters of its own page and of the 9 other pages sharing the most rare words with
the query, shuffled); prompts "Explain in one sentence what the command X does: <description>".

Writes OUT/OUT_NAME.json (every measurement, settings, machine), OUT_NAME.md and
OUT_NAME.png. Does not start Ray. --smoke: 64 sentences, 2 queries, 2 prompts, fp32 and one
other mode, 2 s passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchkit.child import WORKER_FLAG, run_worker
from benchkit.corpus import PASSAGE_CHARS, RERANK_CANDIDATES, build_data
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
    add_output_options,
    command_line,
    machine,
    machine_line,
    output_dir,
    write_report,
)

MODELS = ("embedder", "reranker", "generator")
CPU_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CUDA_PRECISIONS = ("fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4")
EMBED_BATCH = 32
EMBED_CHUNK = 256  # sentences per encode call: the unit of work --max-seconds is checked after
RERANK_CHUNK = 10  # queries (100 pairs) sorted by length together, like one 64-pair batch
GEN_BATCH = 8
GEN_TOKENS = 32
REFERENCE_FACTOR = 3  # fp32's time cap, in --max-seconds
TARGET_SPEEDUP = 1.8
TARGET_COSINE = 0.99
TARGET_TOP1 = 0.95
UNITS = {"embedder": "sentences/s", "reranker": "pairs/s", "generator": "tokens/s"}
TITLES = {
    "embedder": "Embedder: all-MiniLM-L6-v2",
    "reranker": "Reranker: QueryLikelihood over SmolLM2-135M-Instruct",
    "generator": "Generator: SmolLM2-135M-Instruct, greedy",
}


# --- the child process: one (model, precision) ------------------------------------------------
def worker(spec: dict, result_path: Path) -> None:
    import torch

    from deployments.engines import loading
    from deployments.engines import precision as precision_

    loading.set_threads(spec["threads"])
    device, mode = spec["device"], spec["precision"]
    data = json.loads(Path(spec["data"]).read_text())
    budget = Budget(spec["max_seconds"], spec["max_items"])
    cache_dir = model_cache_dir()
    run = {"embedder": run_embedder, "reranker": run_reranker, "generator": run_generator}
    # Import what loading needs before the baseline, so the baseline is the libraries alone.
    if spec["model"] == "embedder":
        from sentence_transformers import SentenceTransformer  # noqa: F401
    elif spec["model"] == "reranker":
        import deployments.engines.scoring  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    rss_base = rss_bytes()
    start = time.perf_counter()
    out = run[spec["model"]](data, mode, device, cache_dir, budget, torch, loading, precision_)
    total_s = time.perf_counter() - start
    result = {
        "model": spec["model"],
        "precision": mode,
        "threads": torch.get_num_threads(),
        "rss_base_mb": mb(rss_base),
        "total_s": round(total_s, 2),
        **out["result"],
    }
    np.save(result_path.with_suffix(".npy"), out["outputs"], allow_pickle=False)
    np.save(Path(str(result_path) + ".calib.npy"), out["calibration"], allow_pickle=False)
    result_path.write_text(json.dumps(result))


class Budget:
    """When a timed pass stops: after the unit of work that passes `seconds`, or that reaches
    `items` (sentences, pairs, prompts), whichever comes first; None: no bound."""

    def __init__(self, seconds: float | None, items: int | None) -> None:
        self.seconds, self.items = seconds, items

    def over(self, elapsed: float, done: int) -> bool:
        return (self.seconds is not None and elapsed > self.seconds) or (
            self.items is not None and done >= self.items
        )


class Meter:
    """Timing of the pass and memory around it: reset the peak after the warm-up."""

    def __init__(self, device: str, model: Any, precision_: Any, load_s: float) -> None:
        import torch

        self.device, self.torch = device, torch
        self.result: dict[str, Any] = {
            "load_s": round(load_s, 2),
            "weights_mb": mb(precision_.weights_bytes(model)),
        }

    def loaded(self) -> None:
        self.result["rss_load_peak_mb"] = mb(peak_rss_bytes())
        self.result["rss_loaded_mb"] = mb(rss_bytes())
        self.result["peak_reset"] = reset_peak_rss()
        if self.device == "cuda":
            self.result["gpu_allocated_mb"] = mb(self.torch.cuda.memory_allocated())
            self.torch.cuda.reset_peak_memory_stats()
        self.cpu = process_cpu_s()
        self.result["loadavg_1m"] = round(os.getloadavg()[0], 2)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.start

    def done(self, seconds: float, items: int, total: int, units: str) -> dict:
        self.result["rss_peak_run_mb"] = mb(peak_rss_bytes())
        threads = self.torch.get_num_threads()
        self.result["cpu_share"] = cpu_share(process_cpu_s() - self.cpu, seconds, threads)
        if self.device == "cuda":
            self.result["gpu_peak_mb"] = mb(self.torch.cuda.max_memory_allocated())
        self.result.update(
            {
                "seconds": round(seconds, 3),
                "items": items,
                "items_total": total,
                "capped": items < total,
                "throughput": items / seconds if seconds else None,
                "unit": units,
            }
        )
        return self.result


def run_embedder(data, mode, device, cache_dir, budget, torch, loading, precision_) -> dict:
    from deployments.engines import embedding
    from serve_app.config import DEFAULT_EMBEDDING_MODEL

    start = time.perf_counter()
    path = loading.local_path(DEFAULT_EMBEDDING_MODEL)
    model = embedding.load_model(path, mode, device)  # as the Embedder loads it
    meter = Meter(device, model, precision_, time.perf_counter() - start)

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return embedding.encode(model, texts, batch_size)

    sentences = data["sentences"]
    encode(sentences[:EMBED_BATCH], EMBED_BATCH)  # warm-up
    meter.loaded()
    parts = []
    for i in range(0, len(sentences), EMBED_CHUNK):
        parts.append(encode(sentences[i : i + EMBED_CHUNK], EMBED_BATCH))
        if budget.over(meter.elapsed(), sum(map(len, parts))):
            break
    seconds = meter.elapsed()
    vectors = np.concatenate(parts)
    result = meter.done(seconds, len(vectors), len(sentences), UNITS["embedder"])
    # auto's own check: deployments/embedder.py's probe on the calibration sentences
    calibration = encode(precision_.calibration_sentences(), 16)
    return {"result": result, "outputs": vectors, "calibration": calibration}


def causal_probe(model, tokenizer, device, precision_, torch) -> np.ndarray:
    """auto's own check (deployments/engines/loading.py): next-token argmax on the
    calibration text."""
    from deployments.engines import loading

    return loading.next_token_probe(tokenizer, device)(model).argmax(-1).cpu().numpy()


def run_reranker(data, mode, device, cache_dir, budget, torch, loading, precision_) -> dict:
    from deployments.engines.scoring import PAIRS_PER_FORWARD, QueryLikelihood
    from serve_app.config import RerankerConfig

    start = time.perf_counter()
    scorer = QueryLikelihood(RerankerConfig(precision=mode), cache_dir, device)
    meter = Meter(device, scorer.module, precision_, time.perf_counter() - start)
    meter.result["pairs_per_forward"] = PAIRS_PER_FORWARD
    sets = data["rerank"]
    scorer.score([(sets[0]["query"], p) for p in sets[0]["passages"][:4]])  # warm-up
    meter.loaded()
    scores: list[float] = []
    pairs = 0
    stop = False
    for c in range(0, len(sets), RERANK_CHUNK):
        chunk = [(s["query"], p) for s in sets[c : c + RERANK_CHUNK] for p in s["passages"]]
        # As the Reranker deployment does: by passage length, PAIRS_PER_FORWARD per pass.
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][1]))
        got = [math.nan] * len(chunk)
        for f in range(0, len(order), PAIRS_PER_FORWARD):
            part = order[f : f + PAIRS_PER_FORWARD]
            for i, (score, _) in zip(part, scorer.score([chunk[i] for i in part]), strict=True):
                got[i] = score
            pairs += len(part)
            if budget.over(meter.elapsed(), pairs):
                stop = True
                break
        scores += got
        if stop:
            break
    seconds = meter.elapsed()
    total = sum(len(s["passages"]) for s in sets)
    result = meter.done(seconds, pairs, total, UNITS["reranker"])
    calibration = causal_probe(scorer.module, scorer.tokenizer, device, precision_, torch)
    scores += [math.nan] * (total - len(scores))  # pairs never scored
    return {"result": result, "outputs": np.asarray(scores), "calibration": calibration}


def run_generator(data, mode, device, cache_dir, budget, torch, loading, precision_) -> dict:
    from serve_app.config import GeneratorConfig

    start = time.perf_counter()
    config = GeneratorConfig(precision=mode)
    tokenizer = loading.load_tokenizer(config, cache_dir)  # left padding
    model = loading.load_causal_lm(config, cache_dir, device, mode)
    meter = Meter(device, model, precision_, time.perf_counter() - start)
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in data["prompts"]
    ]

    def generate(batch_texts: list[str], new_tokens: int) -> list[list[int]]:
        batch = tokenizer(
            batch_texts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=0,
                pad_token_id=tokenizer.pad_token_id,
                top_p=None,
                top_k=None,
                temperature=None,
            )
        rows = []
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            ids = []
            for token in row:
                ids.append(token)
                if token in stops:  # the EOS counts as a generated token; padding after it not
                    break
            rows.append(ids)
        return rows

    generate(texts[:2], 2)  # warm-up
    meter.loaded()
    generated: list[list[int]] = []
    for i in range(0, len(texts), GEN_BATCH):
        generated += generate(texts[i : i + GEN_BATCH], GEN_TOKENS)
        if budget.over(meter.elapsed(), len(generated)):
            break
    seconds = meter.elapsed()
    tokens = sum(len(g) for g in generated)
    result = meter.done(seconds, tokens, len(texts) * GEN_TOKENS, UNITS["generator"])
    result["prompts_done"] = len(generated)
    result["capped"] = len(generated) < len(texts)
    result["sample"] = tokenizer.decode(generated[0], skip_special_tokens=True)
    calibration = causal_probe(model, tokenizer, device, precision_, torch)
    width = GEN_TOKENS + 1
    padded = np.full((len(texts), width), -1, dtype=np.int64)  # -1: not generated
    for k, ids in enumerate(generated):
        padded[k, : len(ids)] = ids
    return {"result": result, "outputs": padded, "calibration": calibration}


# --- the parent: run children, compare with fp32 ---------------------------------------------
def done_units(result: dict) -> int:
    """What a `Budget` counts: sentences, pairs, or prompts."""
    return result.get("prompts_done", result["items"])


def outputs_of(work: Path, model: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    base = work / f"{model}-{mode}.json"
    return np.load(base.with_suffix(".npy")), np.load(Path(str(base) + ".calib.npy"))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import torch

    from deployments.engines import precision as precision_

    return precision_.spearman(torch.as_tensor(a), torch.as_tensor(b))


def compare(model: str, data: dict, ref: tuple, other: tuple) -> dict:
    """Agreement of `other`'s outputs with fp32's (`ref`) on the inputs both finished."""
    (ref_out, ref_cal), (out, cal) = ref, other
    if model == "embedder":
        n = min(len(ref_out), len(out))
        cos = np.sum(ref_out[:n] * out[:n], axis=1)  # both unit length
        ref_cal = ref_cal / np.linalg.norm(ref_cal, axis=1, keepdims=True)
        cal = cal / np.linalg.norm(cal, axis=1, keepdims=True)
        return {
            "compared": int(n),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "auto_check": float(np.sum(ref_cal * cal, axis=1).mean()),
            "auto_check_metric": "mean cosine, calibration sentences",
        }
    auto = float((ref_cal == cal).mean()) if len(ref_cal) == len(cal) else None
    common = {"auto_check": auto, "auto_check_metric": "next-token top-1, calibration text"}
    if model == "reranker":
        sizes = [len(s["passages"]) for s in data["rerank"]]
        bounds = np.cumsum([0, *sizes])
        per_query, top1, own_ref, own = [], [], [], []
        for k, s in enumerate(data["rerank"]):
            a, b = ref_out[bounds[k] : bounds[k + 1]], out[bounds[k] : bounds[k + 1]]
            if np.isnan(a).any() or np.isnan(b).any():
                continue  # a query this precision did not finish
            per_query.append(spearman(a, b))
            top1.append(int(np.argmax(a)) == int(np.argmax(b)))
            own_ref.append(int(np.argmax(a)) == s["own"])
            own.append(int(np.argmax(b)) == s["own"])
        done = ~(np.isnan(ref_out) | np.isnan(out))
        return {
            "compared": len(per_query),
            "spearman_all": spearman(ref_out[done], out[done]) if done.sum() > 1 else None,
            "spearman_per_query": float(np.mean(per_query)) if per_query else None,
            "top1_agreement": float(np.mean(top1)) if top1 else None,
            "own_page_first": float(np.mean(own)) if own else None,
            "own_page_first_fp32": float(np.mean(own_ref)) if own_ref else None,
            **common,
        }
    rows = [k for k in range(len(out)) if out[k, 0] >= 0 and ref_out[k, 0] >= 0]
    exact, prefix = [], []
    for k in rows:
        a, b = ref_out[k][ref_out[k] >= 0], out[k][out[k] >= 0]
        exact.append(len(a) == len(b) and bool((a == b).all()))
        same = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
        prefix.append(same / max(1, len(a)))
    return {
        "compared": len(rows),
        "exact_match": float(np.mean(exact)) if exact else None,
        "matching_prefix": float(np.mean(prefix)) if prefix else None,
        **common,
    }


def precisions_for(device: str, requested: list[str] | None) -> tuple[list[str], list[dict]]:
    """The modes to run, fp32 first, and those skipped with `precision.check`'s reason."""
    from deployments.engines import precision as precision_

    wanted = requested or list(CUDA_PRECISIONS if device == "cuda" else CPU_PRECISIONS)
    wanted = ["fp32", *[p for p in wanted if p != "fp32"]]
    run, skipped = [], []
    for mode in wanted:
        try:
            precision_.check(mode, device)
        except precision_.UnsupportedPrecision as exc:
            skipped.append({"precision": mode, "reason": str(exc)})
            continue
        run.append(mode)
    return run, skipped


def auto_rule(report: dict) -> dict:
    """auto's rule applied to the measurements: among the modes auto tries here, the fastest
    (by this benchmark's throughput) whose auto check passes."""
    from deployments.engines import precision as precision_

    device = report["machine"]["device"]
    picks = {}
    groups = {"embedder": ["embedder"], "causal-lm": ["reranker", "generator"]}
    for group, models in groups.items():
        present = [m for m in models if m in report["models"]]
        if not present:
            continue
        timing_model = present[0]  # the reranker's prefill-shaped pass, like auto's probe
        rows = report["models"][timing_model]["rows"]
        threshold = (
            precision_.MIN_MEAN_COSINE if group == "embedder" else precision_.MIN_TOP1_AGREEMENT
        )
        options = precision_.candidates(device, generative=group == "causal-lm")
        passing = []
        for row in rows:
            if row["precision"] not in options or not row.get("throughput"):
                continue
            check = 1.0 if row["precision"] == "fp32" else row.get("auto_check")
            if check is not None and check >= threshold:
                passing.append(row)
        best = max(passing, key=lambda r: r["throughput"], default=None)
        picks[group] = {
            "models": present,
            "candidates": options,
            "threshold": threshold,
            "timed_by": timing_model,
            "precision": best["precision"] if best else None,
        }
    return picks


def cached_choices() -> dict:
    """What `auto` recorded on this machine (precision-choices.json), if anything."""
    path = model_cache_dir() / "precision-choices.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def targets(report: dict) -> list[dict]:
    rows = []
    picks = report["auto_rule"]

    def row_of(model: str, mode: str | None) -> dict | None:
        rows_ = report["models"].get(model, {}).get("rows", [])
        return next((r for r in rows_ if r["precision"] == mode), None)

    for model, group in (("embedder", "embedder"), ("reranker", "causal-lm")):
        if model not in report["models"]:
            continue
        mode = picks.get(group, {}).get("precision")
        row = row_of(model, mode) or {}
        speed = row.get("ratio")
        rows.append(
            {
                "target": f"{model}: throughput of the pick ({mode}) / fp32",
                "goal": f">= {TARGET_SPEEDUP}",
                "measured": speed,
                "met": speed is not None and speed >= TARGET_SPEEDUP,
            }
        )
        if model == "embedder":
            value, goal, what = row.get("mean_cosine"), TARGET_COSINE, "mean cosine"
        else:
            value, goal, what = row.get("top1_agreement"), TARGET_TOP1, "top-1 agreement"
        if mode == "fp32":
            value = 1.0
        rows.append(
            {
                "target": f"{model}: {what} of the pick ({mode}) with fp32",
                "goal": f">= {goal}",
                "measured": value,
                "met": value is not None and value >= goal,
            }
        )
    return rows


def run(options: argparse.Namespace) -> dict:
    import torch

    device = auto_device(options.device)
    modes, skipped = precisions_for(device, options.precisions)
    if options.smoke and not options.precisions:
        modes = modes[:2]  # fp32 and one other: the whole path, at a fraction of the time
    print(f"building the data from {Path('/usr/share/man')} ...", flush=True)
    data = build_data(
        options.sentences, options.queries, options.prompts, options.seed, options.pages
    )
    report: dict[str, Any] = {
        "settings": {
            "command": command_line(),
            "models": options.models,
            "precisions": modes,
            "skipped": skipped,
            "sentences": len(data["sentences"]),
            "queries": len(data["rerank"]),
            "pairs": sum(len(s["passages"]) for s in data["rerank"]),
            "prompts": len(data["prompts"]),
            "man_pages": data["pages"],
            "threads": options.threads,
            "max_seconds": options.max_seconds,
            "seed": options.seed,
            "smoke": options.smoke,
            "embed_batch": EMBED_BATCH,
            "gen_batch": GEN_BATCH,
            "gen_tokens": GEN_TOKENS,
        },
        "machine": machine(device, options.threads),
        "models": {},
    }
    torch.set_num_threads(1)  # the parent only compares; the children measure
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        work = Path(tmp)
        (work / "data.json").write_text(json.dumps(data))
        for model in options.models:
            rows, failed = {}, []
            # The other modes first, under the time cap; then fp32 on as many inputs as the
            # furthest of them finished, so the reference costs no more than what is compared.
            for mode in [*modes[1:], "fp32"]:
                others = [done_units(r) for m, r in rows.items() if m != "fp32"]
                capped = [r.get("capped") for m, r in rows.items() if m != "fp32"]
                reference = mode == "fp32"
                spec = {
                    "model": model,
                    "precision": mode,
                    "device": device,
                    "threads": options.threads,
                    "data": str(work / "data.json"),
                    "max_seconds": options.max_seconds * (REFERENCE_FACTOR if reference else 1),
                    "max_items": max(others) if reference and others and all(capped) else None,
                }
                print(f"{model} {mode} ...", flush=True)
                timeout = options.max_seconds * REFERENCE_FACTOR * 2 + 900
                name = f"{model}-{mode}"
                result, error = run_worker(__file__, spec, name, work, timeout_s=timeout)
                if result is None:
                    print(f"  {error}", flush=True)
                    failed.append({"precision": mode, "reason": error})
                    continue
                rows[mode] = result
                print(
                    f"  {result['throughput']:.1f} {result['unit']}, {result['weights_mb']} MB "
                    f"weights, RSS {result['rss_loaded_mb']} MB loaded, peak "
                    f"{result['rss_peak_run_mb']} MB, {result['seconds']:.0f} s timed, "
                    f"{result['total_s']:.0f} s in all",
                    flush=True,
                )
            if "fp32" in rows:
                ref = outputs_of(work, model, "fp32")
                for mode, result in rows.items():
                    if mode != "fp32":
                        result.update(compare(model, data, ref, outputs_of(work, model, mode)))
            rows = [rows[m] for m in modes if m in rows]
            base = next((r for r in rows if r["precision"] == "fp32"), None)
            for row in rows:
                if base and base["throughput"] and row.get("throughput"):
                    row["ratio"] = row["throughput"] / base["throughput"]
            report["models"][model] = {"rows": rows, "failed": failed}
    report["auto_rule"] = auto_rule(report)
    report["auto_cached"] = {
        k: v["precision"]
        for k, v in cached_choices().items()
        if isinstance(v, dict) and f"|{device}:" in k
    }
    report["targets"] = targets(report)
    return report


# --- report -----------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# Precision modes: memory, throughput and agreement with fp32",
        "",
        f"Reproduce: `{s['command']}`  ",
        f"Machine: {machine_line(m)}.  ",
        "One run on a shared machine: compare ratios within this report, not across runs.",
        "",
        f"Data (man pages of this machine, {s['man_pages']} pages read, seed {s['seed']}): "
        f"{s['sentences']} sentences of 10-40 words; {s['queries']} queries (NAME "
        f"descriptions) x {RERANK_CANDIDATES} passages = {s['pairs']} pairs (own page's first "
        f"~{PASSAGE_CHARS} characters + the 9 pages sharing the most rare words with the "
        f"query); {s['prompts']} prompts, batches of {s['gen_batch']}, {s['gen_tokens']} new "
        "tokens, greedy.",
        "",
        "Each (model, precision) ran in a fresh process with the same inputs. RSS: the process "
        "after importing the libraries (base), after loading and one warm-up pass (loaded), "
        "and its peak during the timed pass. Throughput is raw, in-process; ratio is to fp32. "
        f"A timed pass stopped after the unit of work (an encode call of {EMBED_CHUNK} "
        f"sentences, a forward pass of pairs, a generate batch) that passed "
        f"{s['max_seconds']:.0f} s; fp32, the reference, ran last, on as many inputs as the "
        f"furthest other mode finished (within {REFERENCE_FACTOR}x that time), so each mode "
        "is compared with fp32 on the inputs it finished (`compared`: sentences, queries, "
        "prompts).",
        "",
    ]
    lines += ["## Targets", ""]
    picks = report["auto_rule"]
    for group, pick in picks.items():
        lines.append(
            f"- `auto` rule for the {group} ({', '.join(pick['models'])}): candidates "
            f"{', '.join(pick['candidates'])}; the fastest by this benchmark's "
            f"{pick['timed_by']} throughput whose auto check (column `auto check`, the same "
            f"probe as deployments/precision.py on deployments/calibration.txt) is >= "
            f"{pick['threshold']}: **{pick['precision']}**."
        )
    lines += [
        "- This approximates `auto`: it times its probe (one calibration batch, best of 3), "
        "this benchmark times the workload below; a close race can go the other way.",
    ]
    if report["auto_cached"]:
        cached = "; ".join(f"`{k}`: {v}" for k, v in report["auto_cached"].items())
        lines.append(f"- What `auto` recorded on this machine (precision-choices.json): {cached}.")
    else:
        lines.append(
            "- `auto` has recorded no choice on this machine yet (precision-choices.json)."
        )
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "**met**" if t["met"] else "**not met**"
        lines.append(f"| {t['target']} | {t['goal']} | {fmt(t['measured'], 3)} | {met} |")
    gpu = m["device"] == "cuda"
    memory_head = "weights MB | RSS base / loaded / peak MB |" + (
        " GPU alloc / peak MB |" if gpu else ""
    )
    columns = {
        "embedder": (
            "mean cos | min cos | auto check (cos) |",
            lambda r: (
                f"{fmt(r.get('mean_cosine'), 4)} | {fmt(r.get('min_cosine'), 4)} | "
                f"{fmt(r.get('auto_check'), 4)} |"
            ),
        ),
        "reranker": (
            "Spearman all | Spearman per query | top-1 agree | own page first | "
            "auto check (top-1 next token) |",
            lambda r: (
                f"{fmt(r.get('spearman_all'), 4)} | {fmt(r.get('spearman_per_query'), 4)} "
                f"| {fmt(r.get('top1_agreement'), 3)} | {fmt(r.get('own_page_first'), 3)} | "
                f"{fmt(r.get('auto_check'), 4)} |"
            ),
        ),
        "generator": (
            "exact match | matching prefix | auto check (top-1 next token) |",
            lambda r: (
                f"{fmt(r.get('exact_match'), 3)} | {fmt(r.get('matching_prefix'), 3)} | "
                f"{fmt(r.get('auto_check'), 4)} |"
            ),
        ),
    }
    for model, entry in report["models"].items():
        head, cells = columns[model]
        lines += [
            "",
            f"## {TITLES[model]}",
            "",
            f"| precision | {memory_head} {UNITS[model]} | vs fp32 | timed | CPU share | "
            f"{head} compared | load s |",
            "|" + "---|" * (9 + head.count("|") + (1 if gpu else 0)),
        ]
        what = {"embedder": "sentences", "reranker": "pairs", "generator": "prompts"}[model]
        for r in entry["rows"]:
            fp32 = r["precision"] == "fp32"
            accuracy = " | ".join(["reference"] * head.count("|")) + " |" if fp32 else cells(r)
            gpu_cells = f" {fmt(r.get('gpu_allocated_mb'))} / {fmt(r.get('gpu_peak_mb'))} |"
            total = r["items_total"] // (GEN_TOKENS if model == "generator" else 1)
            timed = f"{done_units(r)}/{total} {what}"
            lines.append(
                f"| {r['precision']} | {fmt(r['weights_mb'])} | {fmt(r['rss_base_mb'], 0)} / "
                f"{fmt(r['rss_loaded_mb'], 0)} / {fmt(r['rss_peak_run_mb'], 0)} |"
                + (gpu_cells if gpu else "")
                + f" {fmt(r['throughput'])} | {fmt(r.get('ratio'), 2)}x | {timed} | "
                f"{fmt(r.get('cpu_share'), 2)} | {accuracy} "
                f"{'—' if fp32 else fmt(r.get('compared'))} | {fmt(r['load_s'])} |"
            )
        lines += [
            "",
            f"`compared`: {'queries' if model == 'reranker' else what} both this mode and fp32 "
            "finished. `CPU share`: the timed pass's CPU time / (wall time x threads); well "
            "below 1, it waited for cores other work held, and its throughput is understated.",
        ]
        if model == "reranker" and entry["rows"]:
            ref = next((r for r in entry["rows"] if r["precision"] != "fp32"), {})
            if ref.get("own_page_first_fp32") is not None:
                lines += [
                    "",
                    f"`own page first`: share of queries whose own page's passage is ranked "
                    f"first (fp32: {ref['own_page_first_fp32']:.3f}); a quality signal, not "
                    "agreement.",
                ]
        if model == "generator":
            sample = next((r.get("sample") for r in entry["rows"] if r.get("sample")), None)
            if sample:
                lines += ["", f"First fp32 generation: {json.dumps(sample)}"]
        for f in entry["failed"]:
            lines.append(f"\n{f['precision']} failed: `{f['reason'][-300:]}`")
    if s["skipped"]:
        lines += ["", "## Skipped on this device", ""]
        lines += [f"- {k['precision']}: {k['reason']}" for k in s["skipped"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in report["models"] if report["models"][m]["rows"]]
    modes = report["settings"]["precisions"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    width = 0.8 / max(1, len(modes))
    accuracy = {"embedder": "mean_cosine", "reranker": "top1_agreement", "generator": "exact_match"}
    for j, mode in enumerate(modes):
        xs, ratios, notes, peaks, weights = [], [], [], [], []
        for i, model in enumerate(models):
            row = next((r for r in report["models"][model]["rows"] if r["precision"] == mode), None)
            if row is None:
                continue
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            ratios.append(row.get("ratio") or 0.0)
            value = 1.0 if mode == "fp32" else row.get(accuracy[model])
            notes.append(f"{row.get('ratio') or 0:.2f}x\n{fmt(value, 3)}")
            peaks.append(row.get("gpu_peak_mb") or row.get("rss_peak_run_mb") or 0)
            weights.append(row.get("weights_mb") or 0)
        if not xs:
            continue
        bars = left.bar(xs, ratios, width, label=mode, color=f"C{j}")
        left.bar_label(bars, labels=notes, fontsize=7)
        right.bar(xs, peaks, width, color=f"C{j}", alpha=0.45)
        inner = right.bar(xs, weights, width * 0.6, color=f"C{j}", label=mode)
        right.bar_label(inner, fmt="%.0f", fontsize=7)
    left.axhline(TARGET_SPEEDUP, color="grey", ls="--", lw=1)
    left.set_yscale("log", base=2)
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    left.set_ylim(bottom=0.05)
    left.text(
        -0.45,
        TARGET_SPEEDUP,
        f"target {TARGET_SPEEDUP}x",
        fontsize=8,
        ha="left",
        va="bottom",
        color="grey",
    )
    gpu = report["machine"]["device"] == "cuda"
    left.set_title(
        "throughput / fp32, log scale (label: ratio; agreement with fp32: embedder mean cos, "
        "reranker top-1, generator exact match)",
        fontsize=8,
    )
    right.set_title(
        "weights MB (solid, labelled) within "
        + ("peak GPU allocated MB" if gpu else "peak process RSS MB in the timed pass")
        + " (light)",
        fontsize=8,
    )
    for ax in (left, right):
        ax.set_xticks(range(len(models)), models)
        ax.margins(y=0.18)
    left.legend(fontsize=8, loc="upper left")
    m = report["machine"]
    fig.suptitle(
        f"Precision modes on {m['device']}: {m['cpu']}, {m['cores']} cores, "
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
    parser.add_argument("--precisions", help="default: every mode of the device, fp32 always")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100, help="x10 passages each")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per child")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help=f"time cap of a timed pass (fp32's: {REFERENCE_FACTOR}x)",
    )
    parser.add_argument("--pages", type=int, help="man pages to read (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-name", default="precision", help="OUT/NAME.*")
    add_output_options(parser, "64 sentences, 2 queries, 2 prompts; fp32 and one other mode")
    options = parser.parse_args()
    options.models = [m.strip() for m in options.models.split(",") if m.strip()]
    if set(options.models) - set(MODELS) or not options.models:
        parser.error(f"--models: choose from {','.join(MODELS)}")
    if options.precisions:
        options.precisions = [p.strip() for p in options.precisions.split(",") if p.strip()]
    if options.smoke:
        options.sentences = min(options.sentences, 64)
        options.queries = min(options.queries, 2)
        options.prompts = min(options.prompts, 2)
        options.max_seconds = min(options.max_seconds, 2.0)
        options.pages = options.pages or 400
    write_report(run(options), options.out_name, markdown, output_dir(options), plot)


if __name__ == "__main__":
    main()
