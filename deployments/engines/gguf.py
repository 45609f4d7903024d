"""Which weights llama.cpp runs a GGUF model with: as shipped, or re-quantized once to a type
whose kernels are faster here. No Ray here.

A GGUF's quantization type decides which CPU kernels llama.cpp uses. The bundled SmolLM2 ships
as Q4_1, which prompt processing runs through the generic dot-product path; Q8_0 has
llama.cpp's fast matrix kernels. Measured here (docs/benchmarks/generation.md): Q8_0 prefills a
420-token prompt 1.7x as fast as Q4_1 and decodes 8 sequences 1.25x as fast, one sequence at
the same speed. Q8_0 holds a Q4_1 model's weights almost exactly (8 bits where 4 were used),
while Q4_0 (faster still) changes its predictions (KL 0.49 from the shipped model).

`precision: auto` therefore measures, once per machine and model like every precision choice:
the shipped weights (the reference) and each re-quantization in `REQUANTIZE`. A candidate must
keep the shipped model's next-token distributions on the calibration text (mean KL divergence
at most `MAX_KL`, reported as exp(-KL) against `MIN_SIMILARITY`); the fastest that does runs.
Re-quantizing takes about a second and is kept in the model cache folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock

from deployments.engines import precision as precision_
from deployments.engines.base import counting_sequences, run_to_end

if TYPE_CHECKING:
    from deployments.engines.llamacpp import LlamaCppEngine

SHIPPED = "gguf"  # the file's own quantization
# Candidates `auto` tries beside the shipped weights: a type never below the shipped one's bits.
REQUANTIZE = ("q8_0",)
# Mean KL divergence (nats) from the shipped model's next-token distribution that a
# re-quantization may add. `scripts/bench_generation.py` measures each type's (`divergences`):
# F16, which holds the shipped weights exactly, is not at 0 (llama.cpp quantizes activations
# differently per weight type); Q8_0 is near F16; Q4_0 is far past the bound.
MAX_KL = 0.02
MIN_SIMILARITY = math.exp(-MAX_KL)
CALIBRATION_ROWS = 8  # calibration sentences scored (their full distributions are compared)
PROBE_SEQUENCES, PROBE_TOKENS = 8, 16  # the decode part of the timed probe


def ftype(kind: str) -> int:
    import llama_cpp

    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")


def requantized(source: Path, kind: str, cache_dir: Path) -> Path:
    """`source` re-quantized to `kind`, made once and kept in `cache_dir`."""
    import llama_cpp

    target = cache_dir / "gguf" / f"{source.stem}.{kind}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return target
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype(kind)
        params.allow_requantize = True
        params.nthread = len(os.sched_getaffinity(0))
        handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
        os.close(handle)
        try:
            status = llama_cpp.llama_model_quantize(
                str(source).encode(), partial.encode(), ctypes.byref(params)
            )
            if status != 0:
                raise RuntimeError(f"llama.cpp could not quantize {source} to {kind} ({status})")
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    return target


def weights_file(source: Path, kind: str, cache_dir: Path) -> Path:
    return source if kind == SHIPPED else requantized(source, kind, cache_dir)


def trial_engine(source: Path, kind: str, cache_dir: Path, threads: int | None) -> LlamaCppEngine:
    """A llama.cpp engine on `source`'s weights of `kind`, sized for the trials."""
    from deployments.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(
        weights_file(source, kind, cache_dir),
        max_sequences=PROBE_SEQUENCES,
        slot_tokens=512,
        threads=threads,
        prefix_cache=False,
    )


def calibration_rows(engine: LlamaCppEngine) -> list[list[int]]:
    sentences = precision_.calibration_sentences()[:CALIBRATION_ROWS]
    return [r for r in engine.tokenize(sentences) if len(r) > 1]


def log_distributions(engine: LlamaCppEngine, rows: list[list[int]]) -> torch.Tensor:
    """Next-token log-distributions of `engine` at every position of `rows`."""
    return torch.log_softmax(torch.from_numpy(np.concatenate(engine.logits(rows))), dim=-1)


def choose(source: Path, cache_dir: Path, threads: int | None, signature: str):
    """The weights `precision: auto` runs `source` with (a `precision.Choice` whose precision
    is `gguf` or a type in `REQUANTIZE`)."""
    rows: list[list[int]] = []

    def build(kind: str) -> LlamaCppEngine:
        engine = trial_engine(source, kind, cache_dir, threads)
        rows.extend([] if rows else calibration_rows(engine))
        return engine

    def probe(engine: LlamaCppEngine) -> torch.Tensor:
        """Log-distributions at every calibration position (compared), then a short decode of
        a full batch (timed with them: prefill and decode both count)."""
        distributions = log_distributions(engine, rows)
        run_to_end(engine, counting_sequences(engine, PROBE_SEQUENCES, PROBE_TOKENS))
        return distributions

    key = f"gguf|{source}|{source.stat().st_size}|{signature}"
    return precision_.choose(
        key,
        [SHIPPED, *REQUANTIZE],
        build,
        probe,
        similarity,
        MIN_SIMILARITY,
        cache_dir,
    )


def divergences(
    source: Path, kinds: list[str], cache_dir: Path, threads: int | None
) -> dict[str, float]:
    """Mean KL divergence (nats) of each weight type's next-token distributions from the
    shipped weights', on the calibration text `choose` compares them on."""
    shipped = trial_engine(source, SHIPPED, cache_dir, threads)
    rows = calibration_rows(shipped)
    reference = log_distributions(shipped, rows)
    del shipped
    out = {}
    for kind in kinds:
        engine = trial_engine(source, kind, cache_dir, threads)
        out[kind] = divergence(reference, log_distributions(engine, rows))
        del engine
    return out


def divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) of two sets of next-token log-distributions."""
    return (reference.exp() * (reference - other)).sum(-1).mean().item()


def similarity(reference: torch.Tensor, other: torch.Tensor) -> float:
    """exp(-mean KL(reference || other)) of two sets of next-token log-distributions."""
    return math.exp(-max(divergence(reference, other), 0.0))
