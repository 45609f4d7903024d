"""The key a search or RAG request is counted and matched by.

Every search and RAG request is reduced to a key: its parameters with the query normalized
(Unicode NFKC, case-folded, whitespace collapsed) and the names of the models that answer it,
so "What is  HNSW?" and "what is hnsw?" are one popular request, and an answer computed by
other models never matches.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import orjson

from serve_app.protocol.documents import RetrievalRequest


@dataclass(frozen=True)
class Asked:
    """One search or RAG request as counted: `key` names its normalized form."""

    collection: str
    kind: str  # "search" | "rag"
    key: str
    query: str = field(compare=False)  # normalized text
    # As asked (without the collection), to be asked again.
    request: dict[str, Any] = field(compare=False)
    size: int = field(default=0, compare=False)  # bytes of its canonical form


def normalize(query: str) -> str:
    """The form in which queries are counted and matched: "What is  HNSW?" == "what is hnsw?"."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


def ask(kind: str, request: RetrievalRequest, models: str) -> Asked:
    """The counted form of a search or RAG request; `models` names the models answering it,
    so answers of other models never match."""
    asked = request.model_dump(mode="json", exclude={"collection", "stream"})
    query = normalize(request.query)
    canonical = orjson.dumps(
        {**asked, "query": query, "kind": kind, "models": models}, option=orjson.OPT_SORT_KEYS
    )
    key = hashlib.sha256(canonical).hexdigest()
    return Asked(request.collection, kind, key, query, asked, size=len(canonical))
