"""Child processes: a worker that measures one thing and writes its result, or a server that
runs until stopped.

A model measured in a child of its own returns its memory before the next loads, and torch's
thread setting cannot leak between measurements.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchkit.report import ROOT

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORKER_FLAG = "--worker"


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_worker(
    script: str | Path, spec: dict, name: str, work: Path, timeout_s: float, echo: bool = False
) -> tuple[dict | None, str | None]:
    """Run `python script --worker SPEC RESULT` and return (its result, None), or (None, why).

    The script's `--worker` mode reads the JSON `spec` and writes its result as JSON; files
    are named `work/name.*`. With `echo`, the child's stdout (progress lines) is printed as it
    comes; stderr always goes to `work/name.log`.
    """
    spec_path, result = work / f"{name}.spec.json", work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    cmd = [sys.executable, str(Path(script).resolve()), WORKER_FLAG, str(spec_path), str(result)]
    env = {**os.environ, **OFFLINE}
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if echo else err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
        )
        try:
            if echo and proc.stdout is not None:
                for line in proc.stdout:
                    print("  " + line.decode(errors="replace").rstrip(), flush=True)
            code: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
    if code != 0 or not result.exists():
        return None, f"child failed ({code}): {log_tail(log)}"
    return json.loads(result.read_text()), None


# --- servers ----------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: get SIGTERM if the parent dies without cleaning up (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """Long-lived child processes (servers), each in its own process group; `stop_all` ends
    whatever is left, so a failed run leaves nothing behind."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """A child in its own process group, its output in `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs.add(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 15.0) -> None:
        """SIGTERM to the child's whole process group, SIGKILL after `grace_s`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.procs.discard(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, grace_s=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 300.0) -> dict:
    """Poll `url` until it answers 200 (returns its JSON); fail at once if the child exits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}):\n{log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                response = client.get(url)
                if response.status_code == 200:
                    return response.json()
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s:\n{log_tail(log)}")
