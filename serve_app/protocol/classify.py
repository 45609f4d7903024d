"""Shapes of /v1/classify: texts in, one label each, with who decided it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from serve_app.protocol.openai import NonEmptyText, Request

Descriptions = NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
from serve_app.contracts import Skipped  # noqa: E402


class ClassifyRequest(Request):
    inputs: Annotated[list[NonEmptyText], Field(min_length=1)]
    labels: list[NonEmptyText] | dict[NonEmptyText, Descriptions] = Field(
        description="Label names, or names mapped to a description (or several) to compare "
        "texts with; several descriptions of a label are averaged."
    )
    examples: dict[NonEmptyText, Annotated[list[NonEmptyText], Field(min_length=1)]] | None = Field(
        default=None,
        description="Labelled example texts: each label's vector becomes the mean of its "
        "descriptions' and its examples' (few-shot, no training).",
    )
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Default: the service's, calibrated per model pair (see /v1/status).",
    )
    escalate: Literal["auto", "never", "always"] = "auto"

    @model_validator(mode="after")
    def _labels(self) -> ClassifyRequest:
        if len(self.labels) < 2 or len(set(self.names)) != len(self.names):
            raise ValueError("labels: at least two, all different")
        unknown = set(self.examples or {}) - set(self.names)
        if unknown:
            raise ValueError(f"examples: labels not in labels: {sorted(unknown)[:5]}")
        return self

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    @property
    def label_descriptions(self) -> list[list[str]]:
        """Each label's descriptions: its name when the request gives none."""
        if isinstance(self.labels, dict):
            return [[d] if isinstance(d, str) else list(d) for d in self.labels.values()]
        return [[name] for name in self.labels]

    @property
    def descriptions(self) -> list[str]:
        """Every description of every label, in label order."""
        return [d for ds in self.label_descriptions for d in ds]

    @property
    def example_texts(self) -> list[str]:
        return [t for texts in (self.examples or {}).values() for t in texts]


class ClassifyResult(BaseModel):
    index: int
    label: str
    probability: float
    decided_by: Literal["embedding", "llm"]
    escalated: Literal["low_confidence", "contrast_marker", "always"] | None = None
    skipped: Skipped | None = Field(
        default=None,
        description="Why an input meant for the generator kept its fast-path answer: the "
        "request's cap on escalated inputs, a prompt over the token budget, or a full queue.",
    )
    embedding_label: str = Field(description="The fast path's answer, escalated or not.")
    embedding_probability: float


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifyResult]
    model: str
    escalated: int
    skipped: int = Field(
        default=0,
        description="Inputs meant for the generator that kept "
        "their fast-path answer (see each result's `skipped`).",
    )
