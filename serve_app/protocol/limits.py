"""Per-request input limits (`InputLimits`, live in the Ingress's user_config), checked before
any model runs. Each breach is a 400 in OpenAI's error shape naming the offending field."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from serve_app.config import InputLimits
from serve_app.protocol.classify import ClassifyRequest
from serve_app.protocol.documents import IngestRequest, RetrievalRequest
from serve_app.protocol.errors import APIError
from serve_app.protocol.openai import ChatCompletionRequest, EmbeddingRequest
from serve_app.protocol.rerank import RerankRequest


def _at_most(count: int, limit: int, what: str, param: str) -> None:
    if count > limit:
        raise APIError(
            400,
            f"{param}: at most {limit} {what} per request, got {count}.",
            param=param,
            code="too_many_inputs",
        )


def _each_at_most(texts: Iterable[str], limit: int, param: str) -> None:
    for i, text in enumerate(texts):
        if len(text) > limit:
            raise APIError(
                400,
                f"{param}.{i}: at most {limit} characters, got {len(text)}.",
                param=f"{param}.{i}",
                code="input_too_long",
            )


def _json_at_most(value: Any, limit: int, param: str) -> None:
    # Measured as the compact JSON it is stored, cached and answered as.
    size = len(orjson.dumps(value))
    if size > limit:
        raise APIError(
            400,
            f"{param}: at most {limit} bytes as JSON, got {size}.",
            param=param,
            code="input_too_long",
        )


def check_embeddings(request: EmbeddingRequest, limits: InputLimits) -> None:
    _at_most(len(request.texts), limits.max_inputs, "inputs", "input")
    _each_at_most(request.texts, limits.max_input_chars, "input")


def check_rerank(request: RerankRequest, limits: InputLimits) -> None:
    _at_most(len(request.documents), limits.max_documents, "documents", "documents")
    _each_at_most([request.query], limits.max_input_chars, "query")
    _each_at_most(request.texts, limits.max_input_chars, "documents")


def check_chat(request: ChatCompletionRequest, limits: InputLimits) -> None:
    _at_most(len(request.messages), limits.max_messages, "messages", "messages")
    _each_at_most((m.text() for m in request.messages), limits.max_input_chars, "messages")


def check_classify(request: ClassifyRequest, limits: InputLimits, max_labels: int) -> None:
    _at_most(len(request.inputs), limits.max_inputs, "inputs", "inputs")
    _each_at_most(request.inputs, limits.max_input_chars, "inputs")
    _at_most(len(request.labels), max_labels, "labels", "labels")
    _each_at_most(request.names + request.descriptions, limits.max_input_chars, "labels")
    # Descriptions and examples are embedded with the inputs: they share the inputs' budget.
    extra = len(request.descriptions) + len(request.example_texts)
    what = "texts (inputs, label descriptions and examples)"
    _at_most(len(request.inputs) + extra, limits.max_inputs, what, "inputs")
    _each_at_most(request.example_texts, limits.max_input_chars, "examples")


def check_retrieval(request: RetrievalRequest, limits: InputLimits) -> None:
    _each_at_most([request.query], limits.max_input_chars, "query")
    if request.filters:
        _json_at_most(request.filters, limits.max_filter_bytes, "filters")


def check_ingest(request: IngestRequest, limits: InputLimits) -> None:
    _at_most(len(request.documents), limits.max_documents, "documents", "documents")
    _each_at_most((d.text for d in request.documents), limits.max_document_chars, "documents")
    for i, document in enumerate(request.documents):
        _json_at_most(document.metadata, limits.max_metadata_bytes, f"documents.{i}.metadata")


def check_max_tokens(max_tokens: int | None, cap: int) -> None:
    """A generation asks for at most the generator's `max_new_tokens`."""
    if max_tokens is not None and max_tokens > cap:
        raise APIError(
            400, f"max_tokens must be at most {cap}.", param="max_tokens", code="invalid_value"
        )


def check_dimensions(dimensions: int | None, width: int, model: str) -> None:
    """Embeddings are cut to at most the model's own width."""
    if dimensions is not None and dimensions > width:
        raise APIError(
            400,
            f"dimensions must be at most {width} for {model}.",
            param="dimensions",
            code="invalid_value",
        )
