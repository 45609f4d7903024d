"""What the routes send the Generator deployment, and what it streams back.

Kept apart from the generator itself so that the ingress and the RAG route, which only pass
these along, do not import torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


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
