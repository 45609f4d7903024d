"""Every benchmark and load script at a tiny size, one after the other, so none can rot unseen.

    .venv/bin/python scripts/smoke.py [--out DIR] [--only NAME,...] [--list]

Each script runs as a child process, as a user runs it, with `--smoke` and `--out DIR` (a
temporary folder unless given: the figures in docs/benchmarks are never touched). A step passes
when its script exits 0 and wrote every report it names (`NAME.json` and `NAME.md`). The
scripts that start a Ray cluster of their own run first, one at a time; then one app is started
with `serve run` (configs/test.yaml, its PostgreSQL in a temporary folder) for the scripts that
load a running service: loadtest, fuzz, and chaos last, since it kills replicas.

Needs the machine to itself (a Ray cluster of its own): where other work shares it, run it
under `flock /tmp/ray.lock`. Prints the wall time and result of every step; exits 1 when any failed.
`--list` prints the steps; `tests/unit/test_benchlib_smoke.py` checks they cover every script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from benchkit.child import OFFLINE, log_tail
from benchkit.cluster import config_url, serve_run, with_args
from benchkit.report import ROOT

from serve_app.store.embedded import stop_embedded

SCRIPTS = Path(__file__).resolve().parent
SERVICE_CONFIG = ROOT / "configs" / "test.yaml"
SHEDDING_CONFIG = ROOT / "serve_config.yaml"
STEP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Step:
    """One script run: its file, its arguments besides `--smoke --out`, the reports it must
    write, and whether it loads the running service (then `{url}`, `{config}` and `{data}` in
    `args` name that service)."""

    script: str
    args: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()
    service: bool = False


STEPS = (
    Step("bench_classify.py", reports=("classify",)),
    Step("bench_rag_answers.py", reports=("rag_answers",)),
    Step("bench_precision.py", reports=("precision",)),
    Step("bench_batch.py", reports=("batch",)),
    Step("bench_generation.py", reports=("generation",)),
    Step("bench_rag_generator.py", reports=("rag_generator",)),
    Step("bench_serving.py", reports=("serving",)),
    Step("bench_retrieval.py", reports=("retrieval",)),
    Step("bench_precompute.py", reports=("precompute",)),
    Step("bench_peers.py", ("--servers", "project,infinity,naive,raw"), ("peers",)),
    Step("bench_coldstart.py", ("--config", "{shedding_config}"), ("coldstart",)),
    Step("bench_shedding.py", ("--config", "{shedding_config}"), ("shedding",)),
    Step("bench_fastpath.py", ("--config", "{shedding_config}"), ("fastpath",)),
    Step("bench_hops.py", ("--config", "{shedding_config}"), ("hops",)),
    Step("loadtest.py", ("--route", "search", "--url", "{url}"), ("loadtest-search",), True),
    Step("fuzz.py", ("--url", "{url}"), ("fuzz",), True),
    Step(
        "chaos.py",
        ("--config", "{config}", "--url", "{url}", "--data-dir", "{data}"),
        ("chaos",),
        True,
    ),
)


@dataclass
class Outcome:
    script: str
    seconds: float
    passed: bool
    note: str


def temp_config(source: Path, folder: Path, name: str) -> Path:
    """`source` with its PostgreSQL data in `folder/name-pgdata`, written as `folder/name.yaml`:
    a smoke run never touches data/pgdata."""
    config = with_args(
        yaml.safe_load(source.read_text()), store={"data_dir": str(folder / f"{name}-pgdata")}
    )
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_step(step: Step, out: Path, logs: Path, values: dict[str, str]) -> Outcome:
    args = [a.format(**values) for a in step.args]
    cmd = [sys.executable, str(SCRIPTS / step.script), *args, "--smoke", "--out", str(out)]
    log = logs / f"{Path(step.script).stem}.log"
    print(f"== {step.script} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as output:
        try:
            code: int | str = subprocess.run(
                cmd,
                cwd=ROOT,
                env={**os.environ, **OFFLINE},
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=STEP_TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = round(time.perf_counter() - start, 1)
    missing = [
        f"{name}{suffix}"
        for name in step.reports
        for suffix in (".json", ".md")
        if not (out / f"{name}{suffix}").is_file()
    ]
    skipped = [line for line in log.read_text(errors="replace").splitlines() if "skipped" in line]
    if code != 0:
        note = f"exit {code}; log {log}:\n{log_tail(log, 25)}"
    elif missing:
        note = f"no {', '.join(missing)} written; log {log}"
    else:
        note = "; ".join(skipped)
    outcome = Outcome(step.script, seconds, code == 0 and not missing, note)
    print(f"   {'ok' if outcome.passed else 'FAILED'} in {seconds} s {note}", flush=True)
    return outcome


def run(steps: list[Step], out: Path) -> list[Outcome]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="smoke-configs-"))
    try:
        return run_in(steps, out, logs, work)
    finally:  # the embedded PostgreSQL servers outlive their apps: end the ones made here
        for data_dir in work.glob("*-pgdata"):
            stop_embedded(data_dir)


def run_in(steps: list[Step], out: Path, logs: Path, work: Path) -> list[Outcome]:
    values = {"shedding_config": str(temp_config(SHEDDING_CONFIG, work, "serve_config"))}
    outcomes = [run_step(s, out, logs, values) for s in steps if not s.service]
    service = [s for s in steps if s.service]
    if service:
        config = temp_config(SERVICE_CONFIG, work, "service")
        url = config_url(yaml.safe_load(config.read_text()))
        values |= {"url": url, "config": str(config), "data": str(work / "service-pgdata")}
        start = time.perf_counter()
        env = {**os.environ, **OFFLINE, "RAY_AUTH_MODE": "disabled"}
        try:
            with serve_run(config, url, logs / "serve.log", env):
                print(f"== service ready at {url} in {time.perf_counter() - start:.0f} s")
                outcomes += [run_step(s, out, logs, values) for s in service]
        except (RuntimeError, TimeoutError) as e:
            seconds = round(time.perf_counter() - start, 1)
            outcomes += [Outcome(s.script, seconds, False, f"no service: {e}") for s in service]
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="report folder (default: a temporary one)")
    parser.add_argument("--only", help="comma-separated script names, e.g. loadtest,fuzz")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    options = parser.parse_args()
    steps = list(STEPS)
    if options.only:
        wanted = {n.strip().removesuffix(".py") for n in options.only.split(",")}
        steps = [s for s in steps if Path(s.script).stem in wanted]
        unknown = wanted - {Path(s.script).stem for s in steps}
        if unknown:
            parser.error(f"--only: no step for {sorted(unknown)}")
    if options.list:
        for step in steps:
            print(step.script, " ".join(step.args), "->", ", ".join(step.reports))
        return
    out = options.out or Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    start = time.perf_counter()
    outcomes = run(steps, out)
    total = time.perf_counter() - start
    print(f"\nsmoke runs ({total:.0f} s in all, reports in {out}):")
    for o in outcomes:
        print(f"  {'ok    ' if o.passed else 'FAILED'} {o.seconds:7.1f} s  {o.script}")
    if not all(o.passed for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
