"""The rerank shape shared by Cohere and Jina: query and documents in, sorted scores out."""

from __future__ import annotations

from pydantic import BaseModel, Field

from serve_app.protocol.openai import NonEmptyText, Request, Text


class Document(BaseModel):
    text: Text


class RerankRequest(Request):
    model: str | None = None
    query: NonEmptyText
    documents: list[Text | Document] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Document | None = None


class RerankUsage(BaseModel):
    total_tokens: int
    truncated_documents: int = Field(
        default=0, description="Documents (or the query) cut to the tokens the model reads."
    )


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
