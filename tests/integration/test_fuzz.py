"""The HTTP API fuzzed (scripts/fuzz.py): from its own OpenAPI schema, in stateful sequences,
and with arbitrary JSON in every free-form field. Valid and invalid requests alike get no 5xx,
and every error body is OpenAI's JSON error shape."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"
# Per operation and mode (valid, invalid): enough to cross every field's types and bounds,
# few enough for CI.
CASES = 12


def load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzzed_requests_get_no_5xx_and_json_errors(server):
    report = load_fuzz().fuzz(server, CASES)
    print(f"\nfuzz: {report['cases']} cases, statuses {report['statuses']}")
    assert len(report["operations"]) >= 12  # every route of the API was reached
    assert report["cases"] >= 12 * CASES
    assert report["server_errors"] == 0, report["violations"][:5]
    assert report["violations"] == [], report["violations"][:5]
    statuses = report["statuses"]
    assert any(s.startswith("2") for s in statuses) and any(s.startswith("4") for s in statuses)


def test_ingest_search_delete_sequences_stay_consistent(server):
    report = load_fuzz().fuzz_sequences(server, sequences=8, steps=8)
    print(f"\nfuzz sequences: {report['cases']} cases, statuses {report['statuses']}")
    assert report["cases"] >= 8
    assert report["server_errors"] == 0, report["violations"][:5]
    assert report["violations"] == [], report["violations"][:5]


def test_arbitrary_json_values_are_refused_or_round_trip(server):
    report = load_fuzz().fuzz_values(server, examples=40)
    print(f"\nfuzz values: {report['cases']} cases, statuses {report['statuses']}")
    assert report["cases"] >= 3 * 40
    assert report["server_errors"] == 0, report["violations"][:5]
    assert report["violations"] == [], report["violations"][:5]
    assert {"200", "400"} <= set(report["statuses"])  # values both stored and refused
