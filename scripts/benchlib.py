"""What the benchmark scripts share: a description of the machine, and writing a report.

Each script writes `docs/benchmarks/<name>.json`, `.md` and `.png` from one report dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
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


def write_report(
    report: dict,
    name: str,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None] | None = None,
) -> None:
    """`report` as JSON, its markdown and (given `plot`) its chart, under docs/benchmarks/."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (OUT / f"{name}.md").write_text(text)
    written = ".json, .md"
    if plot is not None:
        plot(report, OUT / f"{name}.png")
        written += " and .png"
    print(text)
    print(f"wrote {OUT.relative_to(ROOT)}/{name}{written}")
