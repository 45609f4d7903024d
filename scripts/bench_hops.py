"""Served embeddings by how requests reach the model: ingress coalescing and embedder scaling,
with the machine's CPU per request split by process (stage).

    .venv/bin/python scripts/bench_hops.py [--config serve_config.yaml] [--duration 15] \
        [--warmup 5] [--repeats 3] [--variants default,uncoalesced,...] [--out docs/benchmarks] \
        [--smoke]

One local Ray cluster runs --config as `make run` does (Ray Serve's fast path from
configs/fastpath.env unless the environment sets it). Each variant is a live change of the
running app (the Ingress's `coalescing` and the Embedder's `threads`-free settings:
autoscaling and batching), applied as `serve deploy` applies it; rounds interleave the
variants, and the report takes medians with ranges. Per variant and round:

- shape A: 1 input per request at concurrency 64; shape B: 32 inputs at concurrency 8;
  every input unique in the whole run (no embedding cache can answer);
- shape B while 4 chat streams keep the generator busy (`--chat`): the case where several
  models want the cores at once;
- CPU seconds per request of each process kind over the measured window (HAProxy or Serve's
  proxy, the Ingress replica, the Embedder replicas, Ray's own processes, the load generator):
  where a request's cost goes, hop by hop.

Writes OUT/hops.json and OUT/hops.md. --smoke: one round, 2 s windows, two variants.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from benchkit import loadgen
from benchkit.cluster import in_process, redeploy
from benchkit.corpus import Texts, man_sentences
from benchkit.measure import cpu_by_stage
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    machine,
    output_dir,
    percentiles_ms,
    write_report,
)

from serve_app.launch import load_config

# Live changes of the running app, by name: the Ingress's user_config `coalescing`, and the
# Embedder's autoscaling (how many replicas, one torch thread each, serve its queue).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "uncoalesced": {"coalescing": {"enabled": False}},
    "target32": {"embedder_target": 32},
    "target4": {"embedder_target": 4},
    "target2": {"embedder_target": 2},
    "target1": {"embedder_target": 1},
    "target2-small": {"coalescing": {"max_inputs": 8}, "embedder_target": 2},
    "uncoalesced-target4": {"coalescing": {"enabled": False}, "embedder_target": 4},
}
SHAPES = {"A": (1, 64), "B": (32, 8)}  # inputs per request, concurrency


def overrides(config: dict, variant: dict[str, Any]) -> list[dict[str, Any]]:
    """The `deployments[]` entries that make `variant` out of `config`."""
    app = config["applications"][0]
    by_name = {d["name"]: d for d in app["deployments"]}
    ingress = dict(by_name["Ingress"].get("user_config") or {})
    if "coalescing" in variant:
        ingress["coalescing"] = variant["coalescing"]
    embedder = dict(by_name["Embedder"]["autoscaling_config"])
    if "embedder_target" in variant:
        embedder["target_ongoing_requests"] = variant["embedder_target"]
    return [
        {"name": "Ingress", "user_config": ingress},
        {"name": "Embedder", "autoscaling_config": embedder},
    ]


async def embeddings_load(
    url: str, texts: Texts, shape: str, warmup: float, duration: float
) -> dict:
    size, concurrency = SHAPES[shape]
    bodies = iter(lambda: {"input": texts.take(size)}, None)
    measured = await loadgen.window(
        url, "/v1/embeddings", bodies, concurrency, warmup, duration, meter=cpu_by_stage
    )
    done = measured.statuses().get("200", 0)
    seconds = measured.end - measured.start
    before, after = measured.before, measured.after
    return {
        "sentences_per_s": done * size / seconds,
        "requests_per_s": done / seconds,
        **percentiles_ms(measured.latencies()),
        "errors": len(measured.records) - done,
        "cpu_ms_per_request": {
            stage: 1000 * (after[stage] - before.get(stage, 0.0)) / max(done, 1) for stage in after
        },
    }


async def with_chat(url: str, texts: Texts, warmup: float, duration: float) -> dict:
    """Shape B while 4 chat clients keep the generator busy the whole time."""
    stop = asyncio.Event()
    chats = iter(
        lambda: {
            "messages": [{"role": "user", "content": f"Tell a story about {texts.next()}"}],
            "max_tokens": 64,
        },
        None,
    )
    records: list[loadgen.Record] = []
    async with loadgen.session(url, 4, 300) as session:
        chat = asyncio.ensure_future(
            loadgen.closed_loop(
                session, "/v1/chat/completions", chats, 4, records, time.perf_counter(), stop=stop
            )
        )
        try:
            return await embeddings_load(url, texts, "B", warmup, duration)
        finally:
            stop.set()
            await chat


def measure(url: str, texts: Texts, options: argparse.Namespace) -> dict:
    out = {
        shape: asyncio.run(embeddings_load(url, texts, shape, options.warmup, options.duration))
        for shape in SHAPES
    }
    if options.chat:
        out["B with chat"] = asyncio.run(with_chat(url, texts, options.warmup, options.duration))
    return out


def run(options: argparse.Namespace) -> dict:
    config = load_config(ROOT / options.config)
    texts = Texts(man_sentences(20_000 if not options.smoke else 2_000, seed=3))
    names = options.variants.split(",")
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    with in_process(config) as url:
        for round_ in range(options.repeats):
            for name in names:
                redeploy(config, overrides(config, VARIANTS[name]))
                time.sleep(options.settle)  # autoscaling settles on the new target
                result = measure(url, texts, options)
                rounds[name].append(result)
                for phase, r in result.items():
                    print(
                        f"[round {round_ + 1}] {name} {phase}: {r['sentences_per_s']:.1f} "
                        f"sentences/s, p50 {r['p50']} ms, errors {r['errors']}"
                    )
    return {
        "command": command_line(),
        "machine": machine(),
        "config": options.config,
        "duration_s": options.duration,
        "warmup_s": options.warmup,
        "repeats": options.repeats,
        "variants": {name: VARIANTS[name] for name in names},
        "embedder_target_configured": next(
            d["autoscaling_config"]["target_ongoing_requests"]
            for d in config["applications"][0]["deployments"]
            if d["name"] == "Embedder"
        ),
        "rounds": rounds,
    }


def median_range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def markdown(report: dict) -> str:
    m = report["machine"]
    phases = list(next(iter(report["rounds"].values()))[0])
    lines = [
        "# Served embeddings by how requests reach the model",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['date']}. Config: `{report['config']}` "
        f"with Ray Serve's fast path (configs/fastpath.env); each variant a live change of it. "
        f"{report['warmup_s']:g} s warm-up, {report['duration_s']:g} s measured, median of "
        f"{report['repeats']} interleaved round(s) [range]. Every input unique.",
        "",
        "## Sentences per second",
        "",
        "| variant | " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    for name, rounds in report["rounds"].items():
        cells = [median_range([r[p]["sentences_per_s"] for r in rounds]) for p in phases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Machine CPU per request, by process (ms, shape A, median)",
        "",
    ]
    stages = sorted(
        {s for rounds in report["rounds"].values() for s in rounds[0]["A"]["cpu_ms_per_request"]}
    )
    lines += [
        "| variant | " + " | ".join(stages) + " | total |",
        "|---|" + "---|" * (len(stages) + 1),
    ]
    for name, rounds in report["rounds"].items():
        per = {
            s: statistics.median(r["A"]["cpu_ms_per_request"].get(s, 0.0) for r in rounds)
            for s in stages
        }
        cells = [f"{per[s]:.2f}" for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(per.values()):.2f} |")
    lines += [
        "",
        "Variants: "
        + "; ".join(f"`{n}`: {v or 'as configured'}" for n, v in report["variants"].items())
        + ". As configured: coalescing on, the Embedder's autoscaling target "
        + f"{report.get('embedder_target_configured', '-')} calls in flight per replica.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after a change")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-chat", dest="chat", action="store_false")
    add_output_options(parser, "one round, 2 s windows, two variants")
    options = parser.parse_args()
    if options.smoke:
        options.duration, options.warmup, options.settle, options.repeats = 2.0, 1.0, 2.0, 1
        options.variants = "default,uncoalesced"
    write_report(run(options), "hops", markdown, output_dir(options))


if __name__ == "__main__":
    main()
