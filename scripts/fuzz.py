"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis + hypothesis), bounded.

    .venv/bin/python scripts/fuzz.py [--url http://127.0.0.1:8000] [--cases 25] \\
        [--out docs/benchmarks]

For every operation in /openapi.json, `--cases` requests that fit the schema and `--cases` that
break it (wrong types, missing fields, out-of-range numbers, odd strings). The property: no
answer is a 5xx, and every 4xx body is OpenAI's JSON error shape. Writes OUT/fuzz.json: cases
sent, answers by status, and each violation with its request. Only 127.0.0.1, localhost and
::1 are accepted as targets. `tests/integration/test_fuzz.py` runs the same function.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Generation is bounded in tokens so a run stays short; the cap itself is fuzzed elsewhere.
MAX_TOKENS = 8


def _bounded(case) -> None:
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                case.body[field] = MAX_TOKENS


def _violation(response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and isinstance(error["type"], str)
        except Exception:
            return f"{response.status_code} without a JSON error body"
    return None


def _send_cases(operation, mode, cases: int, base_url: str, timeout_s: float, record) -> None:
    @settings(
        max_examples=cases,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode))
    def send(case) -> None:
        _bounded(case)
        record(case, mode, case.call(base_url=base_url, timeout=timeout_s))

    with contextlib.suppress(Unsatisfiable):  # nothing to break: no parameters, no body
        send()


def fuzz(base_url: str, cases: int = 25, timeout_s: float = 120.0) -> dict[str, Any]:
    """Send `cases` positive and `cases` negative requests per operation; never raises on a
    bad answer, it records it."""
    if urlsplit(base_url).hostname not in LOCAL_HOSTS:
        raise ValueError(f"only a local server may be fuzzed, not {base_url}")
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    statuses: Counter = Counter()
    per_operation: dict[str, int] = {}
    violations: list[dict[str, Any]] = []
    start = time.perf_counter()

    def record(case, mode, response) -> None:
        label = f"{case.operation.method.upper()} {case.operation.path}"
        statuses[str(response.status_code)] += 1
        per_operation[label] = per_operation.get(label, 0) + 1
        if (problem := _violation(response)) is not None:
            violations.append(
                {
                    "operation": label,
                    "mode": str(mode),
                    "problem": problem,
                    "path": case.formatted_path,
                    "query": case.query,
                    "body": repr(case.body)[:500],
                    "answer": response.text[:500],
                }
            )

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _send_cases(operation, mode, cases, base_url, timeout_s, record)
    sent = sum(statuses.values())
    return {
        "cases": sent,
        "operations": per_operation,
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "violations": violations,
        "seconds": round(time.perf_counter() - start, 1),
        "cases_per_operation_and_mode": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--cases", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    report = {
        "command": f"python scripts/fuzz.py --cases {args.cases}",
        **fuzz(args.url, args.cases),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"fuzz: {report['cases']} cases over {len(report['operations'])} operations in "
        f"{report['seconds']} s; statuses {report['statuses']}; "
        f"5xx {report['server_errors']}; violations {len(report['violations'])}"
    )


if __name__ == "__main__":
    main()
