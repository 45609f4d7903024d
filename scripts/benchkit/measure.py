"""Process measurements for the benchmarks: memory, CPU time (this process's, and the
machine's by process kind), the device."""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (peak RSS) to its current RSS; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak_rss` (or the start): VmHWM, else ru_maxrss."""
    with contextlib.suppress(OSError, AttributeError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_cpu_s() -> float:
    """CPU seconds this process has used, all its threads."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


# Process kinds of a served app and its peers: a substring of the command line, first match wins.
STAGES = (
    ("HTTP proxy (HAProxy)", "haproxy"),
    ("HTTP proxy (Serve)", "ProxyActor"),
    ("Ingress", "ServeReplica:rag:Ingress"),
    ("Embedder", "ServeReplica:rag:Embedder"),
    ("Generator", "ServeReplica:rag:Generator"),
    ("other replicas", "ServeReplica"),
    ("Ray (controller, raylet, GCS)", "ray"),
    ("llama-server", "llama-server"),
)
LOAD_GENERATOR = "load generator (this script)"


def stage_of(process, me: int) -> str | None:
    """The STAGES kind of `process` (a psutil.Process); LOAD_GENERATOR for pid `me`."""
    import psutil

    if process.pid == me:
        return LOAD_GENERATOR
    try:
        line = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return next((stage for stage, key in STAGES if key in line), None)


def cpu_by_stage() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process of each STAGES kind: read before
    and after a load window, the difference is where the window's CPU went, hop by hop."""
    import psutil

    me, totals = psutil.Process().pid, defaultdict(float)
    for process in psutil.process_iter():
        stage = stage_of(process, me)
        if stage is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        totals[stage] += times.user + times.system
    return dict(totals)


def cpu_share(cpu_s: float, wall_s: float, threads: int) -> float | None:
    """CPU time over wall time x threads: below ~0.9 the pass waited for cores (other work)."""
    return round(cpu_s / (wall_s * threads), 2) if wall_s > 0 else None


def auto_device(requested: str) -> str:
    """`auto` as cuda where one is visible, else cpu; exits when cuda is asked for and absent."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return requested


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def model_cache_dir() -> Path:
    from serve_app.config import AppConfig

    return AppConfig().model_cache_dir


def mb(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats to `digits`, None and NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
