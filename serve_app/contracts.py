"""Everything that crosses a deployment handle, in one place: what the HTTP layer and the
pipelines send the models and the store, and what comes back.

Plain data only (dataclasses, numpy arrays and the pydantic citation schema), so every layer
can import it without torch, transformers, Ray or FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from serve_app.protocol.documents import Citation

# Why a constrained choice has no answer.
Skipped = Literal["max_escalated", "prompt_too_long", "busy"]


# Generation: what the routes send the Generator, and what it streams back.
@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # The answer never repeats an n-gram of its own tokens (0: off); the prompt may be copied.
    no_repeat_ngram: int = 0


@dataclass(frozen=True)
class Delta:
    """New text of one request; the last one carries `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    truncated_prompt_tokens: int = 0  # cut from the start of the conversation to fit the model


@dataclass
class Choice:
    """The generator's constrained answer: a probability per option, or why there is none."""

    probabilities: list[float] | None
    skipped: Skipped | None = None


# Embeddings and rerank scores.


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dim) float32, unit length
    tokens: list[int]  # tokens per input, after truncation
    cut: list[bool]  # per input: cut at the model's max_seq_length
    model: str  # the model that made them (a collection's vectors must all share one)
    precision: str

    @property
    def truncated(self) -> int:
        """Inputs cut at the model's max_seq_length."""
        return sum(self.cut)

    def split(self, sizes: list[int]) -> list[Embeddings]:
        """One `Embeddings` per consecutive run of `sizes` inputs."""
        ends = np.cumsum(sizes).tolist()
        return [
            Embeddings(
                self.vectors[start:end],
                self.tokens[start:end],
                self.cut[start:end],
                self.model,
                self.precision,
            )
            for start, end in zip([0, *ends[:-1]], ends, strict=True)
        ]


class RerankScore(NamedTuple):
    """One passage's relevance to a query, in the passages' order."""

    score: float
    tokens: int  # tokens the model read for the pair
    cut: bool  # the pair was cut to fit the model


def ranked(scores: list[RerankScore], keep: int | None = None) -> list[int]:
    """Indices of the passages, most relevant first; the first `keep` (None: all)."""
    return sorted(range(len(scores)), key=lambda i: scores[i].score, reverse=True)[:keep]


# The store: collections, documents and search hits.


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    embedding_model: str
    dimensions: int
    version: int  # changes with every change to its documents
    uid: str  # unique across databases: cache keys name it
    text_search_config: str = "simple"  # PostgreSQL's: how its texts become keywords


@dataclass(frozen=True)
class DocumentChunks:
    """One document as it is stored: its id, metadata, and chunk texts with their vectors."""

    id: str
    metadata: dict[str, Any]
    texts: list[str]
    embeddings: np.ndarray  # (len(texts), dimensions), unit length


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    document_id: str
    text: str
    metadata: dict[str, Any]
    score: float  # the search's own: cosine (dense), ts_rank_cd (keyword), fused (hybrid)
    dense_score: float | None = None  # cosine similarity, where the dense search found it
    keyword_score: float | None = None  # ts_rank_cd, where the keyword search found it
    fused_rank: int | None = None  # 1-based place in the fused list (hybrid only)


# Retrieval and RAG answers.


@dataclass(frozen=True)
class Retrieved:
    hits: list[Hit]
    rerank_scores: list[float] | None
    timings: dict[str, float]
    cached_age_s: float | None = None  # answered from the response cache, computed this long ago
    mode: str = "dense"  # the search that found the hits


@dataclass(frozen=True)
class Sources:
    """The first event of an answer: what it may cite, and how long retrieval took."""

    citations: list[Citation]
    timings: dict[str, float]


@dataclass(frozen=True)
class Generated:
    """The last event of an answer: ms from asking the generator to its last token, and to
    its first text (None when it streamed none)."""

    generate_ms: float
    first_token_ms: float | None = None

    def timings(self) -> dict[str, float]:
        """The answer's stage timings, as RAG reports them."""
        first = {} if self.first_token_ms is None else {"first_token_ms": self.first_token_ms}
        return {**first, "generate_ms": self.generate_ms}
