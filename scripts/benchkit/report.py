"""Reports: where they go, what machine they describe, and one way to state latencies.

Every script writes `<out>/<name>.json` (the numbers) and `<out>/<name>.md` (the table a
reader sees), and some a `.png`. `<out>` is docs/benchmarks unless `--out` says otherwise;
`--smoke` runs write to a temporary folder unless given one, so they never overwrite the
published figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS = ROOT / "docs" / "benchmarks"
PERCENTILES = (50, 95, 99)
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def percentiles_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and p99 of latencies in seconds, in milliseconds to 0.01 (None when empty)."""
    if len(latencies) == 0:
        return {f"p{p}": None for p in PERCENTILES}
    values = np.percentile(np.asarray(latencies, dtype=float), PERCENTILES) * 1000.0
    return {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, values, strict=True)}


def add_output_options(parser: argparse.ArgumentParser, smoke: str) -> None:
    """`--smoke` (described by `smoke`: what the tiny run does) and `--out`."""
    parser.add_argument("--smoke", action="store_true", help=f"tiny run: {smoke}")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"report folder (default: {DOCS.relative_to(ROOT)}; with --smoke, a temporary one)",
    )


def output_dir(options: argparse.Namespace) -> Path:
    """The folder `add_output_options` chose: --out, else a temporary one for a smoke run,
    else docs/benchmarks."""
    if options.out is not None:
        return Path(options.out)
    if options.smoke:
        return Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    return DOCS


def command_line() -> str:
    """How this script was run, as a report's `command` field."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return model.group(1).strip() if model else platform.processor() or platform.machine()


def machine(device: str = "cpu", threads: int | None = None) -> dict:
    """CPU, the flags that decide which precision is fast, memory, library versions, date."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    present = set(flags.group(1).split()) if flags else set()
    versions = {}
    for package in ("torch", "transformers", "sentence-transformers", "bitsandbytes"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS if f in present],
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
        "device": device,
        "threads": threads,
        "gpu": gpu,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def machine_line(m: dict) -> str:
    """`machine()` as one line of a report."""
    flags = ", ".join(m["cpu_flags"]) or "none of avx2/avx512/amx"
    gpu = f"GPU {m['gpu']}; " if m.get("gpu") else "no GPU; "
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (
        f"{m['cpu']} ({m['arch']}), {m['cores']} cores, {m['memory_gb']} GB; CPU flags: {flags}; "
        f"{gpu}device {m['device']}, {m['threads']} torch threads; {versions}; "
        f"Python {m['python']}; {m['date'].replace('T', ' ')}"
    )


def write_report(
    report: dict,
    name: str,
    markdown: Callable[[dict], str],
    out: Path = DOCS,
    plot: Callable[[dict, Path], None] | None = None,
) -> Path:
    """`report` as `out/name.json`, its markdown as `out/name.md` and (given `plot` and
    matplotlib) its chart as `out/name.png`; returns the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out / f"{name}.md").write_text(text)
    written = ".json, .md"
    if plot is not None:
        try:
            plot(report, out / f"{name}.png")
            written += " and .png"
        except ImportError:
            print("matplotlib is not installed: no plot written", file=sys.stderr)
    print(text)
    print(f"wrote {out}/{name}{written}")
    return path
