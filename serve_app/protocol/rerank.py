"""The rerank shape shared by Cohere and Jina: query and documents in, sorted scores out."""

from __future__ import annotations

from pydantic import BaseModel, Field

from serve_app.contracts import RerankScore, ranked
from serve_app.protocol.openai import NonEmptyText, Request, Text, new_id


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

    @classmethod
    def of(cls, request: RerankRequest, model: str, scored: list[RerankScore]) -> RerankResponse:
        """The `top_n` best documents, best first, with the tokens read and inputs cut."""
        texts = request.texts
        results = [
            RerankResult(
                index=i,
                relevance_score=scored[i].score,
                document=Document(text=texts[i]) if request.return_documents else None,
            )
            for i in ranked(scored, request.top_n)
        ]
        usage = RerankUsage(
            total_tokens=sum(s.tokens for s in scored),
            truncated_documents=sum(s.cut for s in scored),
        )
        return cls(id=new_id("rerank"), model=model, results=results, usage=usage)
