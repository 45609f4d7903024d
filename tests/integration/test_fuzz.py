"""The HTTP API fuzzed from its own OpenAPI schema (scripts/fuzz.py): valid and invalid requests
alike get no 5xx, and every error body is OpenAI's JSON error shape."""

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
    return module.fuzz


def test_fuzzed_requests_get_no_5xx_and_json_errors(server):
    report = load_fuzz()(server, CASES)
    print(f"\nfuzz: {report['cases']} cases, statuses {report['statuses']}")
    assert len(report["operations"]) >= 12  # every route of the API was reached
    assert report["cases"] >= 12 * CASES
    assert report["server_errors"] == 0, report["violations"][:5]
    assert report["violations"] == [], report["violations"][:5]
    statuses = report["statuses"]
    assert any(s.startswith("2") for s in statuses) and any(s.startswith("4") for s in statuses)
