"""Sentence embeddings: a sentence-transformers model at a precision, loaded and warm, that
counts tokens and encodes texts into unit vectors. No Ray here.

The `Embedder` deployment serves it; benchmarks and tests call `load` and `EmbeddingModel`
directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deployments.engines import loading, precision
from deployments.engines.batching import ForwardBudget

# Sentences per forward pass on CPU. sentence-transformers sorts a batch by length before
# cutting it into passes, so passes of similar-length inputs pad little. scripts/bench_batch.py
# on the 2-core reference machine (bf16, 128-sentence batches): 217 sentences/s in passes of 8,
# 196 in passes of 16, 146 in passes of 64 (docs/benchmarks/batch.md). On a GPU a batch is one
# pass, as far as free memory allows.
SENTENCES_PER_FORWARD = {"cpu": 8, "cuda": 1024}


@dataclass(frozen=True)
class EmbeddingModel:
    """One model at one precision, loaded and warm."""

    source: str
    precision: str
    model: Any  # SentenceTransformer
    counter: loading.TokenCounter  # a tokenizer of its own, safe beside a forward pass
    budget: ForwardBudget
    trials: list[dict]  # `auto`'s measurements (empty when the precision was set)
    measured: bool  # False: the precision was set, or read from an earlier measurement

    @property
    def dimensions(self) -> int:
        return self.model.get_embedding_dimension()

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads of one text; the rest is cut."""
        return self.model.max_seq_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included and before the cut at `max_tokens`."""
        return [len(ids) for ids in self.counter(texts)["input_ids"]]

    def encode(self, texts: list[str], longest: int | None = None) -> np.ndarray:
        """Unit vectors (float32, one row per text). sentence-transformers sorts the texts by
        length and runs them in forward passes of `budget.items(longest)` texts, `longest`
        being the longest text's tokens (default: `max_tokens`)."""
        return encode(self.model, texts, self.budget.items(longest or self.max_tokens))

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.budget.device)


def load(source: str, requested: str, device: str, cache_dir: Path) -> EmbeddingModel:
    """`source` (hub id, path, or a bundled id) at `requested` precision on `device` (`auto`:
    measured once, then read from `cache_dir`), warmed up, its forward passes sized."""
    path = loading.local_path(source)
    choice = precision.resolve(
        requested,
        device,
        f"sentence-transformer|{source}|{precision.device_signature(device)}",
        lambda mode: load_model(path, mode, device),
        probe,
        precision.mean_cosine,
        precision.MIN_MEAN_COSINE,
        cache_dir,
    )
    model = load_model(path, choice.precision, device)
    loaded = EmbeddingModel(
        source=source,
        precision=choice.precision,
        model=model,
        counter=loading.TokenCounter(model.tokenizer),
        budget=ForwardBudget(SENTENCES_PER_FORWARD[device], device),
        trials=[asdict(t) for t in choice.trials],
        measured=choice.measured,
    )
    loaded.encode(["warm up the kernels"] * 8)
    loaded.budget.measure(lambda: _longest_forward(loaded))
    return loaded


def load_model(path: str, mode: str, device: str):
    """A SentenceTransformer from `path` in precision `mode` on `device`, not warmed up."""
    from sentence_transformers import SentenceTransformer

    if mode in precision.BNB:
        model = SentenceTransformer(
            path, device=device, model_kwargs=precision.load_kwargs(mode, device)
        )
    else:
        model = SentenceTransformer(path, device=device)
    return precision.finish(model, mode, device)


def encode(model, texts: list[str], per_forward: int) -> np.ndarray:
    """Unit vectors (float32) of `texts` from a SentenceTransformer, `per_forward` texts per
    forward pass (sentence-transformers sorts them by length first)."""
    with torch.inference_mode():
        vectors = model.encode(
            texts,
            batch_size=per_forward,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
    # Re-normalize in fp32: unit length must hold whatever precision the model ran in.
    return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()


def probe(model) -> torch.Tensor:
    """`auto`'s probe: the calibration sentences' embeddings."""
    with torch.inference_mode():
        return model.encode(
            precision.calibration_sentences(),
            batch_size=SENTENCES_PER_FORWARD["cpu"],
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )


def _longest_forward(loaded: EmbeddingModel) -> int:
    """A forward pass of full-length inputs, to measure activation memory per token."""
    n = SENTENCES_PER_FORWARD["cpu"]
    loaded.encode(["lorem ipsum " * loaded.max_tokens] * n)
    return n * loaded.max_tokens
