"""When the classify cascade escalates: a threshold measured on a labelled calibration set.

The fast path (embedding similarity) answers every input with a confidence. Escalating the
inputs under a threshold to the generator pays only where the generator is measured to be more
accurate than the fast path on those inputs. `calibrate` takes, for each calibration item, the
fast path's confidence and whether each stage was right, and picks the threshold with the best
accuracy whose mean latency fits a budget. The threshold is kept only if the inputs it escalates
are measurably better answered by the generator (McNemar's exact test on the items where the
stages disagree); otherwise it is 0 and `auto` escalates nothing.

Results are recorded per model pair (embedding model, generation model), like the precision
choices: `scripts/bench_classify.py --calibrate` writes them to `CALIBRATIONS`, which ships with
the code, and the Classify deployment and /v1/status read the entry of the configured pair.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, fisher_exact

from serve_app.config import AppConfig

CALIBRATIONS = Path(__file__).with_name("classify_calibration.json")
# Significance a stage difference needs before the cascade acts on it.
ALPHA = 0.05
BAND_EDGES = np.linspace(0.0, 1.0, 11)


@dataclass
class Band:
    """The two stages' accuracy on the calibration items whose confidence is in [low, high)."""

    low: float
    high: float
    items: int
    fast_accuracy: float | None
    slow_accuracy: float | None


@dataclass
class Calibration:
    threshold: float  # escalate inputs whose fast-path confidence is under it; 0: none
    accuracy: float  # expected, on the calibration set, with this threshold
    never_accuracy: float
    always_accuracy: float
    escalation_rate: float
    mean_ms: float  # expected mean latency per input
    latency_budget_ms: float
    p_value: float | None  # McNemar's exact test on the escalated items; None: none escalated
    markers_predict_errors: bool = False
    markers_p_value: float | None = None
    bands: list[Band] = field(default_factory=list)
    items: int = 0
    source: str = ""


def bands(confidence: np.ndarray, fast: np.ndarray, slow: np.ndarray) -> list[Band]:
    """Each stage's accuracy per confidence band of width 0.1."""
    out = []
    for low, high in itertools.pairwise(BAND_EDGES):
        inside = (confidence >= low) & ((confidence < high) | (high == 1.0))
        n = int(inside.sum())
        out.append(
            Band(
                float(low),
                float(high),
                n,
                float(fast[inside].mean()) if n else None,
                float(slow[inside].mean()) if n else None,
            )
        )
    return out


def calibrate(
    confidence: np.ndarray,
    fast_correct: np.ndarray,
    slow_correct: np.ndarray,
    fast_ms: float,
    slow_ms: float,
    latency_budget_ms: float,
) -> Calibration:
    """The escalation threshold that maximizes accuracy within `latency_budget_ms` per input.

    `confidence`: the fast path's top probability per item; `fast_correct`, `slow_correct`:
    whether each stage answered the item right; `fast_ms`: mean latency of the fast path per
    input; `slow_ms`: what escalating one input adds. Ties go to the lower threshold (fewer
    escalations). A threshold whose escalated items are not significantly better answered by
    the generator is never chosen; without one, the threshold is 0 and nothing escalates.
    """
    confidence = np.asarray(confidence, dtype=float)
    fast = np.asarray(fast_correct, dtype=bool)
    slow = np.asarray(slow_correct, dtype=bool)
    n = len(confidence)
    # Candidate thresholds: 0 (escalate nothing) and just above each distinct confidence, at
    # most 1 as the config allows (a confidence of exactly 1 is never escalated).
    above = np.minimum(np.nextafter(np.unique(confidence), np.inf), 1.0)
    candidates = np.unique(np.concatenate([[0.0], above]))
    best, threshold, p_value = (float(fast.mean()) if n else 0.0), 0.0, None
    for candidate in candidates:
        escalated = confidence < candidate
        if fast_ms + escalated.mean() * slow_ms > latency_budget_ms:
            break  # candidates ascend, and so does their latency
        accuracy = float(np.where(escalated, slow, fast).mean())
        if accuracy > best + 1e-12:
            p = _mcnemar(fast[escalated], slow[escalated])
            if p is not None and p < ALPHA:
                best, threshold, p_value = accuracy, float(candidate), p
    escalated = confidence < threshold
    return Calibration(
        threshold=threshold,
        accuracy=float(np.where(escalated, slow, fast).mean()) if n else 0.0,
        never_accuracy=float(fast.mean()) if n else 0.0,
        always_accuracy=float(slow.mean()) if n else 0.0,
        escalation_rate=float(escalated.mean()) if n else 0.0,
        mean_ms=fast_ms + float(escalated.mean() if n else 0.0) * slow_ms,
        latency_budget_ms=latency_budget_ms,
        p_value=p_value,
        bands=bands(confidence, fast, slow),
        items=n,
    )


def _mcnemar(fast: np.ndarray, slow: np.ndarray) -> float | None:
    """One-sided exact McNemar: P(the generator wins this many of the disagreements by
    chance). None when nothing is escalated."""
    if not len(fast):
        return None
    wins, losses = int((slow & ~fast).sum()), int((fast & ~slow).sum())
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def markers_predict_errors(has_marker: np.ndarray, fast_correct: np.ndarray) -> float | None:
    """One-sided Fisher exact test that inputs with a contrast marker are answered wrong by the
    fast path more often than the others: its p-value, or None when either group is empty."""
    marked = np.asarray(has_marker, dtype=bool)
    wrong = ~np.asarray(fast_correct, dtype=bool)
    if marked.all() or not marked.any():
        return None
    table = [
        [int((marked & wrong).sum()), int((marked & ~wrong).sum())],
        [int((~marked & wrong).sum()), int((~marked & ~wrong).sum())],
    ]
    return float(fisher_exact(table, alternative="greater").pvalue)


def pair_key(config: AppConfig) -> str:
    """What a calibration depends on: the two models of the cascade."""
    return f"{config.embedder.model}|{config.generator.model}"


def record(calibration: Calibration, key: str, path: Path | None = None) -> None:
    """Store `calibration` as the entry for `key`, keeping the other pairs'."""
    path = path or CALIBRATIONS
    entries = read_all(path)
    entries[key] = asdict(calibration)
    path.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")


def read_all(path: Path | None = None) -> dict[str, dict]:
    try:
        return json.loads((path or CALIBRATIONS).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Decision:
    """What `auto` does in this deployment, and why: shown by /v1/status."""

    threshold: float
    source: str
    marker_languages: list[str]
    temperature: float

    def status(self) -> dict[str, object]:
        return asdict(self)


def decision(config: AppConfig, path: Path | None = None) -> Decision:
    """The threshold and contrast markers in effect: the config's when it sets them, else the
    calibration recorded for this model pair, else escalate nothing."""
    settings, path = config.classify, path or CALIBRATIONS
    entry = read_all(path).get(pair_key(config))
    languages = settings.contrast_languages
    if languages is None:  # measured: markers only where they predict fast-path errors
        predictive = bool(entry and entry.get("markers_predict_errors"))
        languages = list(settings.contrast_markers) if predictive else []
    if settings.threshold is not None:
        threshold, source = settings.threshold, "config: classify.threshold"
    elif entry is None:
        threshold = 0.0
        source = f"no calibration recorded for {pair_key(config)}: auto escalates nothing"
    else:
        threshold = float(entry["threshold"])
        source = f"calibration: {path.name} [{pair_key(config)}] {entry.get('source', '')}"
    return Decision(threshold, source.strip(), languages, settings.temperature)
