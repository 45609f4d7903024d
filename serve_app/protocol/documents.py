"""Shapes of the document store's routes: ingestion, collections, search and RAG answers."""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from serve_app.config import TEXT_SEARCH_CONFIG_PATTERN, Chunking, SearchMode
from serve_app.protocol.openai import NonEmptyText, Request, Usage, valid_unicode

if TYPE_CHECKING:  # contracts imports this module (citations): types only, no cycle
    from serve_app.contracts import Delta, Generated, Sources

COLLECTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
CollectionName = Annotated[str, Field(pattern=COLLECTION_PATTERN)]
MAX_JSON_DEPTH = 32
# PostgreSQL keeps JSONB numbers exactly and writes them back without exponents, so 1e20
# returns as the integer 100000000000000000000; orjson, which writes every answer, cache entry
# and precomputed answer, refuses integers beyond 64 bits. Numbers stay within int64.
JSON_INT_RANGE = (-(2**63), 2**63 - 1)


def _storable(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain NUL characters (PostgreSQL text cannot hold them)")
    return text


# Text that is stored: valid Unicode, as every input, and without NUL.
StoredText = Annotated[NonEmptyText, AfterValidator(_storable)]
DocumentId = Annotated[StoredText, Field(max_length=256)]


def _json_safe(value: Any, depth: int = 0) -> None:
    """What JSONB stores and gives back unchanged: finite numbers within int64, strings
    without NUL, nesting at most MAX_JSON_DEPTH."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (no NaN or Infinity)")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = JSON_INT_RANGE
        if not low <= value <= high:
            raise ValueError("numbers must lie within the 64-bit integer range")
    if isinstance(value, str):
        _storable(valid_unicode(value))
    if isinstance(value, dict):
        for key, item in value.items():
            _json_safe(key, depth + 1)
            _json_safe(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _json_safe(item, depth + 1)


def _checked(value: dict[str, Any] | None) -> dict[str, Any] | None:
    _json_safe(value)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_checked)]


# --- ingestion ----------------------------------------------------------------------------
class DocumentIn(Request):
    id: DocumentId | None = Field(
        default=None, description="Makes ingestion idempotent; defaults to a hash of the text."
    )
    text: StoredText
    metadata: JsonObject = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.id or "sha256:" + hashlib.sha256(self.text.encode()).hexdigest()[:32]


class IngestRequest(Request):
    collection: CollectionName
    documents: list[DocumentIn] = Field(min_length=1)
    chunking: Chunking | None = None
    text_search_config: str | None = Field(
        default=None,
        pattern=TEXT_SEARCH_CONFIG_PATTERN,
        description="PostgreSQL's text-search configuration for keyword search (`simple`, "
        "`english`, ...), fixed when the collection is created. Default: the collection's; "
        "for a new one the service's (`retrieval.text_search_config`, english).",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> IngestRequest:
        keys = [d.key for d in self.documents]
        if len(set(keys)) != len(keys):
            raise ValueError("document ids must be unique within a request")
        return self


class IngestedDocument(BaseModel):
    id: str
    chunks: int


class IngestResponse(BaseModel):
    collection: str
    documents: list[IngestedDocument]
    ingested: int
    chunks: int


class CollectionInfo(BaseModel):
    name: str
    embedding_model: str
    dimensions: int
    documents: int
    chunks: int
    created_at: datetime


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# --- search -------------------------------------------------------------------------------
class RetrievalRequest(Request):
    """What search and RAG both ask of retrieval."""

    collection: CollectionName
    query: StoredText  # counted in PostgreSQL (popular queries)
    top_k: int = Field(default=10, ge=1, le=200, description="Chunks retrieved.")
    filters: JsonObject | None = Field(default=None, description="JSONB containment.")
    rerank: bool = False
    rerank_top_n: int | None = Field(
        default=None, ge=1, le=200, description="Chunks kept after reranking."
    )
    ef_search: int | None = Field(default=None, ge=1, le=1000, description="HNSW candidates.")
    mode: SearchMode | None = Field(
        default=None,
        description='dense (vectors), keyword (full text: "phrases", -excluded words, or) or '
        "hybrid (both, fused by reciprocal rank). Default: the service's (hybrid).",
    )


class SearchRequest(RetrievalRequest):
    pass


class SearchResult(BaseModel):
    chunk_id: int
    document_id: str
    text: str
    metadata: dict[str, Any]
    score: float = Field(
        description="The mode's own: cosine (dense), keyword_score (keyword), fused (hybrid)."
    )
    rerank_score: float | None = None
    dense_score: float | None = Field(
        default=None, description="Cosine similarity, where the dense search found the chunk."
    )
    keyword_score: float | None = Field(
        default=None,
        description="Where the keyword search found the chunk: the idf of the query's words it "
        "holds, plus a tenth of its normalized ts_rank_cd.",
    )
    fused_rank: int | None = Field(
        default=None, description="Hybrid: the chunk's place (from 1) before any rerank."
    )


class Timings(BaseModel):
    embed_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    fit_ms: float = 0.0  # counting the sources' tokens to keep those that fit the context
    first_token_ms: float = 0.0  # from asking the generator to its first text
    generate_ms: float = 0.0


class CacheInfo(BaseModel):
    """Where a cached answer came from, and how old it is (also sent as the `Age` header)."""

    source: Literal["response", "precomputed"] = Field(
        description="response: the search cache filled by an earlier request; precomputed: "
        "computed ahead of time for a popular query."
    )
    age_s: float = Field(description="Seconds since the answer was computed.")


class SearchResponse(BaseModel):
    collection: str
    mode: SearchMode | None = Field(default=None, description="The mode that answered.")
    results: list[SearchResult]
    timings: Timings
    cached: bool = Field(default=False, description="Answered from a cache.")
    cache: CacheInfo | None = None


# --- answers ------------------------------------------------------------------------------
class RagRequest(RetrievalRequest):
    top_k: int = Field(default=10, ge=1, le=100, description="Chunks retrieved.")
    # Off unless asked: reranking the fused top 10 added 0 to recall@1 on the man-page set
    # and 0.075-0.125 on the Debian-package set, for 1.1-1.4 s more before the first token
    # (docs/benchmarks/retrieval.md).
    rerank: bool = Field(
        default=False,
        description="Reorder the top_k chunks with the reranker before keeping rerank_top_n "
        "(about a second more on CPU).",
    )
    # 3: on 48 labelled man-page questions (SmolLM2-135M, transformers bf16, one sitting), 3
    # sources got 0.79 of the answers whose source was retrieved citing it (23 of 48 in all)
    # and none degenerate; 4 sources 0.71 (22 of 48) and 0.04, over a prompt a third longer
    # (docs/benchmarks/rag_answers.md).
    rerank_top_n: int | None = Field(
        default=3,
        ge=1,
        le=20,
        description="Chunks the model reads: the first of the reranked, or of the retrieved.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Default: 256, or the generator's cap if lower."
    )
    stream: bool = False


class Citation(BaseModel):
    number: int = Field(description="The [n] the answer cites this source by.")
    document_id: str
    chunk_id: int
    score: float
    text: str


class RagUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RagResponse(BaseModel):
    answer: str
    finish_reason: Literal["stop", "length"]
    citations: list[Citation]
    usage: RagUsage
    timings: Timings
    cached: bool = Field(default=False, description="A precomputed answer.")
    cache: CacheInfo | None = None

    @classmethod
    def of(cls, sources: Sources, text: str, last: Delta, generated: Generated) -> RagResponse:
        """The whole answer: the generator's text joined, with its citations and timings."""
        return cls(
            answer=text,
            finish_reason=last.finish_reason,
            citations=sources.citations,
            usage=RagUsage(**Usage.of(last).model_dump()),
            timings=Timings(**sources.timings, **generated.timings()),
        )


# --- the RAG stream's events (`stream: true`), each one SSE `data:` line ------------------
class RagDelta(BaseModel):
    """New text of the answer."""

    type: Literal["delta"] = "delta"
    text: str


class StreamUsage(RagUsage):
    truncated_prompt_tokens: int | None = None  # present where the generator reported it


class RagDone(BaseModel):
    """The last event: why the answer ended, its sources, usage and timings; for a
    precomputed answer also `cached` and `cache`. Sent without its null fields."""

    type: Literal["done"] = "done"
    finish_reason: Literal["stop", "length"]
    citations: list[Citation]
    usage: StreamUsage
    timings: dict[str, float]  # the stages that ran, then first_token_ms and generate_ms
    cached: bool | None = None
    cache: CacheInfo | None = None

    @classmethod
    def of(cls, sources: Sources, last: Delta, generated: Generated) -> RagDone:
        return cls(
            finish_reason=last.finish_reason,
            citations=sources.citations,
            usage=StreamUsage(**Usage.of(last).model_dump()),
            timings={**sources.timings, **generated.timings()},
        )

    @classmethod
    def precomputed(cls, answer: dict[str, Any], cache: CacheInfo) -> RagDone:
        """The done event of a stored RagResponse (as JSON), served from the cache."""
        fields = ("finish_reason", "citations", "usage", "timings")
        return cls(**{k: answer[k] for k in fields}, cached=True, cache=cache)
