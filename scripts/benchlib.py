"""What the benchmark scripts share: a description of the machine, writing a report, and
`serve run` of a config for the length of a block.

Each script writes `docs/benchmarks/<name>.json`, `.md` and `.png` from one report dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
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


@contextlib.contextmanager
def serving(
    config: Path, url: str, log: Path, env: dict[str, str], timeout_s: float = 600.0
) -> Iterator[float]:
    """`serve run config` (its output in `log`) until the block ends; yields the seconds until
    /ready answered 200. The cluster it started is stopped afterwards."""
    import httpx

    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [BIN / "serve", "run", str(config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve run exited with {proc.returncode}; see {log}")
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"not ready within {timeout_s:.0f} s; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ready").status_code == 200:
                        break
                time.sleep(0.25)
        yield time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([BIN / "ray", "stop", "--force"], capture_output=True)
