"""Shapes of /v1/classify: texts in, one label each, with who decided it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from serve_app.protocol.openai import NonEmptyText, Request


class ClassifyRequest(Request):
    inputs: Annotated[list[NonEmptyText], Field(min_length=1)]
    labels: list[NonEmptyText] | dict[NonEmptyText, NonEmptyText] = Field(
        description="Label names, or names mapped to a description to compare texts with."
    )
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Default: the service's (0.8)."
    )
    escalate: Literal["auto", "never", "always"] = "auto"

    @model_validator(mode="after")
    def _labels(self) -> ClassifyRequest:
        if len(self.labels) < 2 or len(set(self.names)) != len(self.names):
            raise ValueError("labels: at least two, all different")
        return self

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    @property
    def descriptions(self) -> list[str]:
        if isinstance(self.labels, dict):
            return list(self.labels.values())
        return list(self.labels)


class ClassifyResult(BaseModel):
    index: int
    label: str
    probability: float
    decided_by: Literal["embedding", "llm"]
    escalated: Literal["low_confidence", "contrast_marker", "always"] | None = None
    embedding_label: str = Field(description="The fast path's answer, escalated or not.")
    embedding_probability: float


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifyResult]
    model: str
    escalated: int
