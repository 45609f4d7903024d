"""The in-process benchmarks run at a tiny size, so none can silently break.

Each runs as a child process, as a user runs it, on the bundled models; with `--smoke` it
prints its table and writes no report.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Both label their questions with the machine's manual pages.
needs_man = pytest.mark.skipif(
    not Path("/usr/share/man/man1").is_dir(), reason="no manual pages on this machine"
)


def run_script(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_man
def test_bench_rag_answers_smoke():
    out = run_script("scripts/bench_rag_answers.py", "--smoke")
    rows = [line for line in out.splitlines() if line.startswith(("| before", "| now"))]
    assert len(rows) == 2, out


@needs_man
def test_bench_classify_smoke():
    out = run_script("scripts/bench_classify.py", "--smoke")
    assert "never" in out and "always" in out, out
