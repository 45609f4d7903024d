"""scripts/smoke.py (`make bench-smoke`) runs every benchmark and load script, each with the
reports it must write, and every such script takes `--smoke` and `--out`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))  # as when a script runs as a file: `benchkit` beside it

import smoke  # noqa: E402

LOADED = {"loadtest.py", "chaos.py", "fuzz.py"}


def test_every_benchmark_and_load_script_is_a_step():
    wanted = {p.name for p in SCRIPTS.glob("bench_*.py")} | LOADED
    steps = {step.script for step in smoke.STEPS}
    assert steps == wanted
    assert all(step.reports for step in smoke.STEPS)
    # Those that need a running service are the load scripts, and chaos comes last.
    assert {s.script for s in smoke.STEPS if s.service} == LOADED
    assert smoke.STEPS[-1].script == "chaos.py"


def test_every_step_takes_smoke_and_out():
    for step in smoke.STEPS:
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / step.script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "--smoke" in done.stdout and "--out" in done.stdout, step.script


def test_user_tools_do_not_import_benchmark_code():
    for tool in ("ingest.py", "monitor.py"):
        text = (SCRIPTS / tool).read_text()
        assert "import benchkit" not in text and "from benchkit" not in text, tool
        assert "bench" not in text.replace("benchmarks", ""), tool
