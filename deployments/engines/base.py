"""The contract every generation engine keeps, and what the engines share. No Ray here.

The `Generator` deployment owns admission (`@serve.batch`), streaming, cancellation and
`model_info`; it drives whichever engine is configured through this contract, one step at a
time, from a thread:

    sequence = engine.sequence(request)     # template and tokenize; raises on bad input
    engine.add([sequence, ...])             # prefill, and join the sequences in flight
    engine.sample()                         # one token for every sequence in flight
    ... each sequence's `delta` (or `error`) holds what its caller gets for this step:
    ... the Generator streams it now, before the next forward pass runs;
    engine.forward()                        # done sequences leave (and their cache); one
                                            # forward pass for the rest, for the next sample

`step()` is `sample()` then `forward()`, for callers that stream nothing. Streaming between the
two sends each token one forward pass sooner, the first included: the prompt's own pass gives
the first token's logits.

Scoring (the reranker's query likelihood, `/v1/classify`'s constrained choice) goes through
`logprobs`, on the same engine as the answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.contracts import Delta, GenerationRequest


@dataclass
class Sequence:
    """One request's decoding, as every engine keeps it."""

    request: GenerationRequest
    prompt: list[int]
    ids: list[int] = field(default_factory=list)  # tokens generated so far, eos excluded
    sent: int = 0  # characters of the decoded text already emitted
    dropped: int = 0  # prompt tokens cut from the start to fit the context window
    delta: Delta | None = None  # this step's output
    abandoned: bool = False  # its caller went away: it leaves at the next step
    error: Exception | None = None  # what failed it this step: its caller gets it, it leaves
    engine: Any = None  # the engine's own per-sequence data (random generator, slot, ...)

    @property
    def done(self) -> bool:
        return self.error is not None or bool(self.delta and self.delta.finish_reason)

    @property
    def budget(self) -> int:
        """Cache tokens the sequence holds when it has used all of its `max_tokens`."""
        return len(self.prompt) + self.request.max_tokens


class GenerationEngine(Protocol):
    """A causal LM that decodes many sequences at once. Methods that compute block: the
    deployment calls them from a thread, one at a time."""

    name: str  # "transformers", "llama.cpp", "vllm"
    context_tokens: int  # the model's window: prompt and answer together
    max_sequences: int  # sequences it can decode at once (0: bounded by tokens only)
    joins_mid_decode: bool  # new sequences may join between steps (continuous batching)

    def info(self) -> dict[str, Any]:
        """What `/v1/status` shows: precision, device, threads, trials, capabilities."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes the engine holds (weights, cache), by kind."""
        ...

    def sequence(self, request: GenerationRequest) -> Sequence:
        """The request's prompt, templated and tokenized, cut from the start to leave room for
        `max_tokens`; not yet in flight."""
        ...

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ready for the assistant."""
        ...

    @property
    def end_of_turn(self) -> list[int]:
        """The tokens that end an assistant's turn (empty if the model has none)."""
        ...

    def add(self, sequences: list[Sequence]) -> None:
        """Prefill `sequences` and put them in flight. If it raises, none of them joined and
        the sequences already in flight are untouched."""
        ...

    def sample(self) -> None:
        """One token for every sequence in flight, from the last pass's logits: each gets its
        `delta` (or its `error`, if something failed for it alone). Abandoned sequences end
        here. No forward pass."""
        ...

    def forward(self) -> None:
        """Done and abandoned sequences leave; one forward pass of the sampled tokens for the
        others. If it raises, the sequences in flight are lost: call `reset`."""
        ...

    def step(self) -> None:
        """`sample()`, then `forward()`."""
        ...

    def in_flight(self) -> list[Sequence]:
        """The sequences being decoded, in no particular order."""
        ...

    def reset(self) -> None:
        """Drop every sequence in flight and its cache."""
        ...

    def logprobs(self, rows: list[list[int]], tails: list[int]) -> list[list[float]]:
        """For each row of token ids, the log-probabilities of its last `tails[k]` tokens,
        each given every token before it (one pass per batch, no sampling)."""
        ...


def advance(
    sequence: Sequence,
    token: int,
    eos_ids: set[int],
    decode: Callable[[list[int]], str],
) -> Delta:
    """Take one token into `sequence`; return the text that is now safe to emit.

    `decode` turns the generated ids into text. Stop strings end the answer where they begin
    (they are never sent); text that could still become a stop string, or an incomplete
    character, is held back until the next token settles it."""
    finish = None
    if sequence.abandoned:
        return Delta("", "cancelled", len(sequence.prompt), len(sequence.ids), sequence.dropped)
    if token in eos_ids:
        finish = "stop"
    else:
        sequence.ids.append(token)
    text = decode(sequence.ids)
    stops = sequence.request.stop
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    elif finish is None and len(sequence.ids) >= sequence.request.max_tokens:
        finish = "length"
    end = len(text)
    if finish is None:
        end -= max((len(s) - 1 for s in stops), default=0)
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
    new = text[sequence.sent : max(end, sequence.sent)]
    sequence.sent += len(new)
    completion = len(sequence.ids) + (token in eos_ids)
    return Delta(new, finish, len(sequence.prompt), completion, sequence.dropped)


def merge(first: Delta, later: Delta) -> Delta:
    """`first` then `later` as one delta: the text of both, the counts and ending of `later`."""
    return Delta(
        text=first.text + later.text,
        finish_reason=later.finish_reason,
        prompt_tokens=later.prompt_tokens,
        completion_tokens=later.completion_tokens,
        truncated_prompt_tokens=later.truncated_prompt_tokens,
    )


def run_to_end(engine: GenerationEngine, sequences: list[Sequence]) -> list[str]:
    """Add `sequences` and step until none is in flight, as the Generator's loop does minus
    Serve and streaming: each one's whole answer text. For tests and benchmarks."""
    texts, seen = [""] * len(sequences), [None] * len(sequences)
    engine.add(sequences)
    while engine.in_flight():
        engine.sample()
        for k, s in enumerate(sequences):
            if s.delta is not None and s.delta is not seen[k]:
                texts[k], seen[k] = texts[k] + s.delta.text, s.delta
        engine.forward()
    return texts


def counting_sequences(engine: GenerationEngine, count: int, max_tokens: int) -> list[Sequence]:
    """`count` distinct short chat prompts ("Count from k to k+40.") for timing trials."""
    return [
        engine.sequence(
            GenerationRequest(
                messages=[{"role": "user", "content": f"Count from {k} to {k + 40}."}],
                max_tokens=max_tokens,
            )
        )
        for k in range(count)
    ]
