"""RAG's own Generator against one shared with chat, under chat and RAG at once.

The app from the serve config is launched once per `rag.generator` setting (`own`: RAG answers
on a Generator deployment of their own, whose `engine: auto` weighs RAG's long prompts;
`shared`: one Generator for every route). Each launch ingests this repository's docs, warms
both routes, then for `--seconds` runs closed-loop streaming chat clients while one client
asks unique RAG questions one after another, streamed. The report gives, per setting and
round, chat tokens/s, TTFT and TPOT, and RAG TTFT and total latency; settings alternate
between rounds (the order reversed every round) and the table shows medians over rounds.

    .venv/bin/python scripts/bench_rag_generator.py          # docs/benchmarks/rag_generator.md
    .venv/bin/python scripts/bench_rag_generator.py --smoke --out /tmp/rag-generator-smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from bench_generation import (
    QUESTION_FORMS,
    RAG_COLLECTION,
    RAG_QUESTIONS,
    TOPICS,
    Streamed,
    chat_bodies,
    generator_engine,
    rag_query,
    streaming_loop,
    summarize,
)
from benchkit import report
from benchkit.cluster import in_process, with_args
from benchkit.corpus import Texts
from benchkit.measure import fmt

from serve_app.config import GeneratorConfig
from serve_app.launch import load_config

SETTINGS = ("own", "shared")


async def mixed(
    url: str, questions: Texts, start: int, streams: int, seconds: float, max_tokens: int
) -> tuple[list[Streamed], float, list[Streamed]]:
    """Chat from `streams` clients and RAG from one, for `seconds` together."""
    rag: list[Streamed] = []

    async def rag_client() -> None:
        deadline = time.perf_counter() + seconds
        for k in range(start, 10**9):
            if time.perf_counter() >= deadline:
                return
            question = f"{RAG_QUESTIONS[k % len(RAG_QUESTIONS)]} (asked {k})"  # never cached
            rag.append(await rag_query(url, question, max_tokens))

    bodies = chat_bodies(questions, start * 100, max_tokens)
    chat, _ = await asyncio.gather(streaming_loop(url, bodies, streams, seconds), rag_client())
    answers, wall = chat
    return answers, wall, rag


def run_setting(setting: str, options: argparse.Namespace, rounds: int, questions: Texts) -> dict:
    """Launch the app with `rag.generator: setting` and load it for `rounds` rounds."""
    with tempfile.TemporaryDirectory(prefix="bench-rag-generator-") as work:
        config = with_args(
            load_config(options.config),
            store={"data_dir": str(Path(work) / "pgdata")},
            rag={"generator": setting},
        )
        print(f"launching with rag.generator: {setting} ...", flush=True)
        with in_process(config, num_cpus=os.cpu_count()) as url:
            engines = {
                role: (generator_engine(url, role) or {}).get("engine")
                for role in ("generator", "rag_generator")
            }
            docs = sorted((report.ROOT / "docs").glob("*.md"))[: 2 if options.smoke else None]
            documents = [{"id": p.name, "text": p.read_text()} for p in docs]
            httpx.post(
                f"{url}/v1/documents",
                json={"collection": RAG_COLLECTION, "documents": documents},
                timeout=600,
                trust_env=False,
            ).raise_for_status()
            asyncio.run(rag_query(url, RAG_QUESTIONS[0], options.max_tokens))  # warm-up
            warm = chat_bodies(questions, 10**6, options.max_tokens)
            asyncio.run(streaming_loop(url, warm, options.streams, 3))
            results = []
            for round_ in range(rounds):
                start = 1000 * (round_ + 1) + (0 if setting == "own" else 500)
                chat, wall, rag = asyncio.run(
                    mixed(url, questions, start, options.streams, options.seconds,
                          options.max_tokens)
                )  # fmt: skip
                results.append(summary(chat, wall, rag, options.streams))
                print(f"{setting} round {round_ + 1}: {results[-1]}", flush=True)
    return {"engines": engines, "rounds": results}


def summary(chat: list[Streamed], wall: float, rag: list[Streamed], streams: int) -> dict:
    ok = [a for a in rag if a.status == "200" and a.ttft is not None]
    return {
        "chat": summarize(chat, wall, streams),
        "rag_answered": len(ok),
        "rag_failed": len(rag) - len(ok),
        "rag_ttft_p50_ms": report.percentiles_ms([a.ttft for a in ok])["p50"],
        "rag_total_p50_ms": report.percentiles_ms([a.total for a in ok])["p50"],
    }


def medians(rounds: list[dict]) -> dict:
    def median(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 1) if values else None

    keys = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms")
    return {
        **{f"chat_{k}": median([r["chat"][k] for r in rounds]) for k in keys},
        "chat_failed": sum(r["chat"]["failed"] for r in rounds),
        "rag_answered": sum(r["rag_answered"] for r in rounds),
        "rag_failed": sum(r["rag_failed"] for r in rounds),
        "rag_ttft_p50_ms": median([r["rag_ttft_p50_ms"] for r in rounds]),
        "rag_total_p50_ms": median([r["rag_total_p50_ms"] for r in rounds]),
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# RAG's own Generator against a shared one, chat and RAG at once",
        "",
        f"The app from `{s['config']}`, launched once per `rag.generator` setting. Each launch "
        f"ingests this repository's docs/*.md, then for {s['seconds']} s a round, "
        f"{s['streams']} closed-loop clients stream chat answers (unique short questions, "
        f"greedy, {s['max_tokens']} tokens at most) while one client asks unique RAG questions "
        "one after another, streamed. Settings alternate between rounds; medians of "
        f"{s['rounds']} rounds. TTFT: to the first text; TPOT: (last - first text) / "
        "(tokens - 1).",
        "",
        "| rag.generator | engines (chat / RAG) | chat tok/s | chat TTFT p50 / p99 (ms) | "
        "chat TPOT p50 (ms) | RAG answers | RAG TTFT p50 (ms) | RAG total p50 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, run in result["runs"].items():
        m, e = run["medians"], run["engines"]
        lines.append(
            f"| {setting} | {e['generator']} / {e['rag_generator'] or e['generator']} | "
            f"{fmt(m['chat_tok_s'])} | {fmt(m['chat_ttft_p50_ms'])} / "
            f"{fmt(m['chat_ttft_p99_ms'])} | {fmt(m['chat_tpot_p50_ms'])} | "
            f"{m['rag_answered']} ({m['rag_failed']} failed) | {fmt(m['rag_ttft_p50_ms'])} | "
            f"{fmt(m['rag_total_p50_ms'])} |"
        )
    own, shared = (result["runs"][k]["medians"] for k in SETTINGS)
    ratio = ratio_of(own["chat_tok_s"], shared["chat_tok_s"])
    lines += [
        "",
        f"Chat tokens/s, own / shared: **{fmt(ratio, 2)}**. RAG TTFT p50, shared / own: "
        f"**{fmt(ratio_of(shared['rag_ttft_p50_ms'], own['rag_ttft_p50_ms']), 2)}**.",
        "",
        f"Machine: {report.machine_line(result['machine'])}",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def generator_threads(config: Path) -> int:
    args = load_config(config)["applications"][0]["args"].get("generator", {})
    return GeneratorConfig(**args).torch_threads


def ratio_of(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=report.ROOT / "serve_config.yaml")
    parser.add_argument("--streams", type=int, default=4, help="chat clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    report.add_output_options(parser, "1 round of 8 s per setting, 2 chat clients, 2 docs")
    options = parser.parse_args()
    if options.smoke:
        options.streams, options.seconds, options.rounds = 2, 8.0, 1
        options.max_tokens = 16
    questions = Texts([f.format(t=t) for f in QUESTION_FORMS for t in TOPICS])
    # One launch per setting and round would cost minutes each: rounds run within a launch,
    # and the launches alternate the order they run in (own first, then shared first).
    runs: dict[str, dict] = {}
    for k in range(options.rounds):
        for setting in SETTINGS if k % 2 == 0 else SETTINGS[::-1]:
            run = run_setting(setting, options, 1, questions)
            kept = runs.setdefault(setting, {"engines": run["engines"], "rounds": []})
            kept["rounds"] += run["rounds"]
    for run in runs.values():
        run["medians"] = medians(run["rounds"])
    result = {
        "settings": {
            "config": os.path.relpath(options.config, report.ROOT),
            "streams": options.streams,
            "seconds": options.seconds,
            "rounds": options.rounds,
            "max_tokens": options.max_tokens,
        },
        "runs": runs,
        "machine": report.machine("cpu", generator_threads(options.config)),
        "command": report.command_line(),
    }
    path = report.write_report(result, "rag_generator", markdown, report.output_dir(options))
    print(markdown(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
