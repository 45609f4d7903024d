"""OpenAI's shapes for models, embeddings and chat completions, so OpenAI clients work as-is."""

from __future__ import annotations

import base64
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:  # contracts imports the protocol (citations): types only, no cycle
    from serve_app.contracts import Delta, Embeddings


class Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; unsupported known ones fail.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def valid_unicode(text: str) -> str:
    # JSON can spell lone surrogates (\\ud800); no tokenizer or database takes them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
NonEmptyText = Annotated[Text, Field(min_length=1)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --- models -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "rag-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- embeddings ---------------------------------------------------------------------------


class EmbeddingRequest(Request):
    model: str | None = None
    input: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    truncated_inputs: int = Field(
        default=0, description="Inputs longer than the model reads, cut at its maximum."
    )


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage

    @staticmethod
    def body(result: Embeddings, request: EmbeddingRequest, model: str) -> bytes:
        """This shape as JSON, written by orjson straight from float32 rows: through pydantic
        and json.dumps, thousands of floats per answer cost more than the hop itself. Rows cut
        to `dimensions` (checked by `limits.check_dimensions`) are normalized again."""
        vectors = result.vectors
        if request.dimensions is not None:
            vectors = vectors[:, : request.dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        if request.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = list(vectors)  # float32 rows, written by orjson without a Python float each
        tokens = sum(result.tokens)
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)
            ],
            "model": model,
            # truncated_inputs: inputs longer than the model reads, cut at its maximum.
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "truncated_inputs": result.truncated,
            },
        }
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


# --- chat completions ---------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # Only an assistant turn may come without text (OpenAI's tool-call turns).
        if self.role != "assistant" and not self.text():
            raise ValueError(f"a {self.role} message needs non-empty content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: Literal[False] = False
    tools: None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    truncated_prompt_tokens: int = Field(
        default=0, description="Tokens cut from the conversation's start to fit the model."
    )

    @classmethod
    def of(cls, delta: Delta) -> Usage:
        """The usage a generation's last delta reports."""
        return cls(
            prompt_tokens=delta.prompt_tokens,
            completion_tokens=delta.completion_tokens,
            total_tokens=delta.prompt_tokens + delta.completion_tokens,
            truncated_prompt_tokens=delta.truncated_prompt_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None

    @classmethod
    def of(cls, completion_id: str, created: int, model: str, text: str, last: Delta):
        """The whole answer: its text joined, and the last delta's finish reason and usage."""
        message = AssistantMessage(content=text)
        return cls(
            id=completion_id,
            created=created,
            model=model,
            choices=[Choice(message=message, finish_reason=last.finish_reason)],
            usage=Usage.of(last),
        )


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
