"""The cascade's calibration arithmetic and the decision the service takes from it."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app import cascade
from serve_app.config import AppConfig


def synthetic(n: int, band: float, seed: int = 0):
    """Confidences uniform on [0.15, 1): under `band` the fast path is right 30% of the time
    and the generator 90%; above it the fast path 95% and the generator 50%."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.15, 1.0, n)
    low = confidence < band
    fast = rng.random(n) < np.where(low, 0.3, 0.95)
    slow = rng.random(n) < np.where(low, 0.9, 0.5)
    return confidence, fast, slow


def test_escalates_exactly_the_band_where_the_generator_is_better():
    confidence, fast, slow = synthetic(2000, band=0.4)
    c = cascade.calibrate(confidence, fast, slow, fast_ms=20, slow_ms=1000, latency_budget_ms=1e9)
    assert 0.37 <= c.threshold <= 0.43
    assert c.accuracy > max(c.never_accuracy, c.always_accuracy) + 0.05
    assert c.p_value is not None and c.p_value < cascade.ALPHA
    assert c.escalation_rate == pytest.approx(float((confidence < c.threshold).mean()))
    # The bands show where: the generator ahead below 0.4, behind above it.
    for band in c.bands:
        if band.items and band.high <= 0.4:
            assert band.slow_accuracy > band.fast_accuracy
        if band.items and band.low >= 0.4:
            assert band.slow_accuracy < band.fast_accuracy


def test_a_generator_that_is_never_better_is_never_asked():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.15, 1.0, 1000)
    fast = rng.random(1000) < 0.33 + 0.6 * confidence  # the fast path's usual shape
    slow = rng.random(1000) < 1 / 6  # chance, everywhere
    c = cascade.calibrate(confidence, fast, slow, fast_ms=20, slow_ms=1000, latency_budget_ms=1e9)
    assert c.threshold == 0.0 and c.escalation_rate == 0.0 and c.p_value is None
    assert c.accuracy == c.never_accuracy and c.mean_ms == 20


def test_a_lucky_handful_is_not_measurably_better():
    # The generator wins the 2 least confident items and loses nothing: not significant.
    confidence = np.array([0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    fast = np.array([0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
    slow = np.array([1, 1, 1, 1, 1, 1, 1, 1], dtype=bool)
    c = cascade.calibrate(confidence, fast, slow, fast_ms=20, slow_ms=1000, latency_budget_ms=1e9)
    assert c.threshold == 0.0


def test_the_latency_budget_caps_escalation():
    confidence, fast, slow = synthetic(2000, band=0.4)
    # 20 ms + 10% of 1000 ms: at most a tenth of the inputs may escalate.
    c = cascade.calibrate(confidence, fast, slow, fast_ms=20, slow_ms=1000, latency_budget_ms=120)
    assert 0 < c.escalation_rate <= 0.1 and c.mean_ms <= 120
    assert c.threshold < 0.4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 1.0), st.booleans(), st.booleans()), min_size=1, max_size=200
    ),
    st.floats(20.0, 2000.0),
)
def test_calibration_never_loses_accuracy_or_breaks_its_budget(rows, budget):
    confidence, fast, slow = (np.array(column) for column in zip(*rows, strict=True))
    c = cascade.calibrate(confidence, fast, slow, fast_ms=20, slow_ms=500, latency_budget_ms=budget)
    assert c.accuracy >= c.never_accuracy
    assert c.mean_ms <= budget + 1e-9
    assert 0.0 <= c.threshold <= 1.0
    assert c.threshold == 0.0 or (c.p_value is not None and c.p_value < cascade.ALPHA)


def test_markers_count_only_where_they_predict_errors():
    wrong_when_marked = np.array([1] * 20 + [0] * 80, dtype=bool)
    fast_correct = ~wrong_when_marked
    assert cascade.markers_predict_errors(wrong_when_marked, fast_correct) < 0.001
    unrelated = np.array([1, 0] * 50, dtype=bool)
    assert cascade.markers_predict_errors(unrelated, np.array([1, 1, 0, 0] * 25)) > 0.3
    assert cascade.markers_predict_errors(np.ones(10, dtype=bool), np.ones(10)) is None


def recorded(tmp_path, **entry):
    path = tmp_path / "calibration.json"
    key = cascade.pair_key(AppConfig())
    path.write_text(json.dumps({key: {"threshold": 0.42, "source": "(test)", **entry}}))
    return path


def test_decision_comes_from_config_then_calibration_then_nothing(tmp_path):
    path = recorded(tmp_path)
    measured = cascade.decision(AppConfig(), path)
    assert measured.threshold == 0.42 and measured.source.startswith("calibration:")
    assert measured.marker_languages == []  # not measured to predict errors: off
    configured = cascade.decision(AppConfig(classify={"threshold": 0.7}), path)
    assert configured.threshold == 0.7 and configured.source == "config: classify.threshold"
    other_pair = AppConfig(generator={"model": "someone/else"})
    nothing = cascade.decision(other_pair, path)
    assert nothing.threshold == 0.0 and "escalates nothing" in nothing.source


def test_markers_follow_the_calibration_unless_the_config_names_languages(tmp_path):
    path = recorded(tmp_path, markers_predict_errors=True)
    assert set(cascade.decision(AppConfig(), path).marker_languages) == {"en", "ko"}
    only_ko = AppConfig(classify={"contrast_languages": ["ko"]})
    assert cascade.decision(only_ko, path).marker_languages == ["ko"]
    off = AppConfig(classify={"contrast_languages": []})
    assert cascade.decision(off, path).marker_languages == []


def test_record_keeps_other_pairs(tmp_path):
    path = recorded(tmp_path)
    confidence, fast, slow = synthetic(500, band=0.4)
    c = cascade.calibrate(confidence, fast, slow, fast_ms=20, slow_ms=1000, latency_budget_ms=1e9)
    cascade.record(c, "a|b", path)
    entries = cascade.read_all(path)
    assert entries["a|b"]["threshold"] == c.threshold
    assert entries[cascade.pair_key(AppConfig())]["threshold"] == 0.42


def test_the_shipped_calibration_is_read_for_the_default_pair():
    entry = cascade.read_all().get(cascade.pair_key(AppConfig()))
    assert entry is not None, "run scripts/bench_classify.py --calibrate"
    assert 0.0 <= entry["threshold"] <= 1.0 and entry["items"] > 0
