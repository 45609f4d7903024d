"""Constrained answering over any generation engine: which of a few options the model would
give as its whole reply. No Ray here."""

from __future__ import annotations

import math

from deployments.engines.base import GenerationEngine
from serve_app.contracts import Choice


def choose(
    engine: GenerationEngine,
    messages: list[dict[str, str]],
    options: list[str],
    max_prompt_tokens: int,
) -> Choice:
    """The probability of each option as the assistant's whole reply to `messages`: a softmax
    over each option's log-probability, its tokens and the end of the turn together, from
    one pass over all options. A prompt whose longest option takes it over
    `max_prompt_tokens` is not run."""
    prompt = engine.chat_prompt(messages)
    # The end of the turn makes each option the whole reply: without it, an option that
    # begins another ("bug", "bug report") would be scored as that one's start.
    end = engine.end_of_turn
    answers = [a + end for a in engine.tokenize(options)]
    if len(prompt) + max(len(a) for a in answers) > max_prompt_tokens:
        return Choice(None, "prompt_too_long")
    logprobs = engine.logprobs([prompt + a for a in answers], [len(a) for a in answers])
    # The reply's log-probability (a sum): a mean would favour options whose later tokens
    # follow from their first, whatever the text says.
    totals = [math.fsum(row) for row in logprobs]
    top = max(totals)
    weights = [math.exp(t - top) for t in totals]
    return Choice([w / sum(weights) for w in weights])
