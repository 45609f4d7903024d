"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis + hypothesis), bounded.

    .venv/bin/python scripts/fuzz.py [--url http://127.0.0.1:8000] [--cases 25] \\
        [--sequences 20] [--values 100] [--out docs/benchmarks] [--smoke]

Three runs, each with the property that no answer is a 5xx and every 4xx body is OpenAI's JSON
error shape:
- schema: for every operation in /openapi.json, `--cases` requests that fit the schema and
  `--cases` that break it (wrong types, missing fields, out-of-range numbers, odd strings);
- sequences: `--sequences` stateful runs of ingest, search, delete a document, search, delete
  the collection (a hypothesis state machine), checking as well that a deleted document is
  never found again and that stored metadata comes back as sent;
- values: `--values` arbitrary JSON values (integers past 64 bits, NaN, NUL, lone surrogates,
  deep nesting) in every free-form field: ingest metadata, search and RAG filters. Each is
  refused with 400 or round-trips: stored, searched by, and returned unchanged.
Writes OUT/fuzz.json (cases sent, answers by status, and each violation with its request) and
OUT/fuzz.md. Only 127.0.0.1, localhost and ::1 are accepted as targets. --smoke: 2 cases per
operation and mode, 2 sequences, 5 values. `tests/integration/test_fuzz.py` runs the
same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import schemathesis
from benchkit.loadgen import local_url
from benchkit.report import add_output_options, command_line, output_dir, write_report
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    rule,
    run_state_machine_as_test,
)
from schemathesis import GenerationMode

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


# Every kind of JSON value, with the troublesome ones made likely: integers past 64 bits, huge
# and non-finite floats, NUL, lone surrogates, and nesting past the service's depth limit (32).
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**80).flatmap(lambda n: st.sampled_from([n, -n]))
    | st.floats()
    | st.sampled_from([1e19, 1e20, -1e300, 9.2e18, 5e-324, float("nan"), float("inf")])
    | st.text()
    | st.sampled_from(["\x00", "a\x00b", "\ud800", "x\udfff", "é", ""])
)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def json_values() -> st.SearchStrategy:
    """Arbitrary JSON values, as a client could send them."""
    trees = st.recursive(
        _SCALARS,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )
    return trees | st.integers(30, 36).map(_nested)


def _json(body: Any) -> bytes:
    # Python's json spells NaN as NaN and lone surrogates as \ud800, as some clients do.
    return json.dumps(body).encode()


def same_json(sent: Any, returned: Any) -> bool:
    """Equal as JSON values; PostgreSQL may give a float back as the integer of equal value."""
    if isinstance(sent, dict) and isinstance(returned, dict):
        return sent.keys() == returned.keys() and all(same_json(sent[k], returned[k]) for k in sent)
    if isinstance(sent, list) and isinstance(returned, list):
        return len(sent) == len(returned) and all(map(same_json, sent, returned))
    if isinstance(sent, bool) or isinstance(returned, bool):
        return sent is returned
    if isinstance(sent, int | float) and isinstance(returned, int | float):
        return sent == returned or math.isclose(sent, returned, rel_tol=1e-15)
    return sent == returned


class Tally:
    """Answers by status, and what broke the property, for one run."""

    def __init__(self) -> None:
        self.statuses: Counter = Counter()
        self.violations: list[dict[str, Any]] = []

    def check(self, label: str, response: httpx.Response, body: Any = None) -> None:
        self.statuses[str(response.status_code)] += 1
        if (problem := _violation(response)) is not None:
            self.fail(label, problem, body, response.text)

    def fail(self, label: str, problem: str, body: Any, answer: str = "") -> None:
        self.violations.append(
            {
                "operation": label,
                "problem": problem,
                "body": repr(body)[:500],
                "answer": answer[:500],
            }
        )

    def report(self) -> dict[str, Any]:
        return {
            "cases": sum(self.statuses.values()),
            "statuses": dict(sorted(self.statuses.items())),
            "server_errors": sum(n for s, n in self.statuses.items() if s.startswith("5")),
            "violations": self.violations,
        }


def _settings(examples: int, steps: int | None = None) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps or 10,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _local(base_url: str) -> None:
    local_url(base_url)  # ValueError unless on this machine: only a local server is fuzzed


def _timed(run, *args) -> dict[str, Any]:
    start = time.perf_counter()
    report = run(*args)
    return {**report, "seconds": round(time.perf_counter() - start, 1)}


def fuzz_values(base_url: str, examples: int = 100, timeout_s: float = 120.0) -> dict[str, Any]:
    """Arbitrary JSON in ingest metadata, search filters and RAG filters, on a live collection.
    A value accepted as metadata must come back unchanged from a search filtered by itself."""
    _local(base_url)
    tally = Tally()
    collection = f"fuzz-values-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:

        def post(label: str, path: str, body: dict) -> httpx.Response:
            response = client.post(path, content=_json(body), headers=JSON_HEADERS)
            tally.check(label, response, body)
            return response

        seed = {"collection": collection, "documents": [{"id": "seed", "text": "a seed text"}]}
        post("POST /v1/documents", "/v1/documents", seed)

        @_settings(examples)
        @given(value=json_values(), n=st.integers(0, 10**6))
        def send(value: Any, n: int) -> None:
            metadata = {"v": value}
            doc = {"id": f"d{n}", "text": f"value {n}", "metadata": metadata}
            body = {"collection": collection, "documents": [doc]}
            ingested = post("POST /v1/documents", "/v1/documents", body)
            search = {"collection": collection, "query": f"value {n}", "filters": metadata}
            found = post("POST /v1/search", "/v1/search", {**search, "top_k": 5})
            if ingested.status_code == 200 and found.status_code == 200:
                results = [r for r in found.json()["results"] if r["document_id"] == f"d{n}"]
                if not results or not same_json(metadata, results[0]["metadata"]):
                    tally.fail("POST /v1/search", "stored metadata not found as sent", body)
            rag = {**search, "rerank": False, "max_tokens": 1, "rerank_top_n": 1}
            post("POST /v1/rag/query", "/v1/rag/query", rag)

        send()
        client.delete(f"/v1/collections/{collection}")
    return tally.report()


JSON_HEADERS = {"content-type": "application/json"}


IDS = st.lists(st.sampled_from(["a", "b", "c", "d/e", "f g"]), min_size=1, unique=True)
# Mostly values the store takes, so that sequences go on with data; sometimes any JSON value.
METADATA = st.dictionaries(
    st.sampled_from(["k", "tag"]),
    st.integers(-5, 5) | st.text(max_size=5) | json_values(),
    max_size=2,
)


class Sequences(RuleBasedStateMachine):
    """Ingest, search, delete a document, search again, delete the collection, in any order
    hypothesis picks; the model of what is stored says what each answer must hold."""

    base_url = ""
    timeout_s = 120.0
    tally = Tally()
    collections = Bundle("collections")

    def __init__(self) -> None:
        super().__init__()
        self.client = httpx.Client(base_url=self.base_url, timeout=self.timeout_s)
        self.stored: dict[str, set[str]] = {}  # collection -> document ids

    def teardown(self) -> None:
        for name in self.stored:
            self.client.delete(f"/v1/collections/{name}")
        self.client.close()

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        content = None if body is None else _json(body)
        response = self.client.request(method, path, content=content, headers=JSON_HEADERS)
        self.tally.check(f"{method} {path.split('/')[2]}", response, body)
        return response

    @rule(target=collections, ids=IDS)
    def new_collection(self, ids: list[str]) -> str:
        name = f"fuzz-seq-{uuid.uuid4().hex[:8]}"
        self.stored[name] = set()
        self.ingest(name, ids, {})
        return name

    @rule(collection=collections, ids=IDS, metadata=METADATA)
    def ingest(self, collection: str, ids: list[str], metadata: dict) -> None:
        if collection not in self.stored:
            return
        documents = [{"id": i, "text": f"text of {i}", "metadata": metadata} for i in ids]
        answer = self._call(
            "POST", "/v1/documents", {"collection": collection, "documents": documents}
        )
        if answer.status_code == 200:
            self.stored[collection] |= set(ids)

    @rule(collection=collections, top_k=st.integers(1, 10))
    def search(self, collection: str, top_k: int) -> None:
        body = {"collection": collection, "query": "text of a", "top_k": top_k}
        answer = self._call("POST", "/v1/search", body)
        if answer.status_code == 200:
            found = {r["document_id"] for r in answer.json()["results"]}
            if not found <= self.stored.get(collection, set()):
                self.tally.fail("POST search", f"found deleted {found}", body, answer.text)
            elif self.stored.get(collection) and not found:
                self.tally.fail("POST search", "stored documents not found", body, answer.text)
        elif answer.status_code == 404 and self.stored.get(collection):
            self.tally.fail("POST search", "stored collection not found", body, answer.text)

    @rule(collection=collections, document=st.sampled_from(["a", "b", "c", "d/e", "f g", "zz"]))
    def delete_document(self, collection: str, document: str) -> None:
        answer = self._call("DELETE", f"/v1/documents/{collection}/{quote(document)}")
        expected = 200 if document in self.stored.get(collection, set()) else 404
        if answer.status_code != expected:
            self.tally.fail("DELETE documents", f"expected {expected}", document, answer.text)
        self.stored.get(collection, set()).discard(document)

    @rule(collection=consumes(collections))
    def delete_collection(self, collection: str) -> None:
        self._call("DELETE", f"/v1/collections/{collection}")
        self.stored.pop(collection, None)


def fuzz_sequences(
    base_url: str, sequences: int = 30, steps: int = 15, timeout_s: float = 120.0
) -> dict[str, Any]:
    """`sequences` state-machine runs of up to `steps` calls each."""
    _local(base_url)
    tally = Tally()
    machine = type(
        "Run", (Sequences,), {"base_url": base_url, "timeout_s": timeout_s, "tally": tally}
    )
    run_state_machine_as_test(machine, settings=_settings(sequences, steps))
    return tally.report()


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
    _local(base_url)
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


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Fuzzing the HTTP API",
        "",
        f"Command: `{report['command']}`",
        "",
        "| run | cases | seconds | statuses | 5xx | violations |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (
        ("schema", report),
        ("sequences", report["sequences"]),
        ("values", report["values"]),
    ):
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(run["statuses"].items()))
        lines.append(
            f"| {name} | {run['cases']} | {run['seconds']} | {statuses} | "
            f"{run['server_errors']} | {len(run['violations'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--cases", type=int, default=25)
    parser.add_argument("--sequences", type=int, default=30)
    parser.add_argument("--values", type=int, default=100)
    add_output_options(parser, "2 cases per operation and mode, 2 sequences, 5 values")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.sequences, args.values = 2, 2, 5
    try:
        local_url(args.url)
    except ValueError as e:
        parser.error(f"--url: {e}")
    report = {
        "command": command_line(),
        **fuzz(args.url, args.cases),
        "sequences": _timed(fuzz_sequences, args.url, args.sequences),
        "values": _timed(fuzz_values, args.url, args.values),
    }
    runs = [report, report["sequences"], report["values"]]
    report["all"] = {
        "cases": sum(r["cases"] for r in runs),
        "server_errors": sum(r["server_errors"] for r in runs),
        "violations": sum(len(r["violations"]) for r in runs),
    }
    write_report(report, "fuzz", markdown, output_dir(args))


if __name__ == "__main__":
    main()
