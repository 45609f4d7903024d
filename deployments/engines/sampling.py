"""Choosing each sequence's next token from its row of logits. No Ray here.

Shared by the generation engines, so an answer's sampling settings behave the same whichever
engine decodes it. Every value the API accepts samples a token: logits are sanitized to
bounded float32 first, and a row whose probabilities are still unusable falls back to its
argmax.
"""

from __future__ import annotations

import torch

from serve_app.contracts import GenerationRequest

# Below this temperature sampling is greedy: a logit gap of 0.05 between the best two tokens
# already leaves the runner-up e^-50 of the mass, and dividing by much smaller values overflows
# float32 (1e-45 is a valid temperature by the API's bounds).
GREEDY_BELOW = 1e-3
# Logits are clamped to +-LOGIT_BOUND before sampling (real ones are tens at most), so that
# logits / temperature stays finite for every temperature at or above GREEDY_BELOW.
LOGIT_BOUND = 1e4
# The tokens top_p sampling sorts first; more only when these hold less than top_p of the mass.
NUCLEUS_FIRST_K = 64


def new_rng(request: GenerationRequest, device: str) -> torch.Generator | None:
    """The random generator of a seeded, sampled request (None: greedy, or unseeded)."""
    if request.seed is None or request.temperature <= 0:
        return None
    return torch.Generator(device).manual_seed(request.seed)


def sample_row(
    logits: torch.Tensor,
    request: GenerationRequest,
    said: list[int],
    rng: torch.Generator | None = None,
) -> int:
    """The next token of one sequence from its float32 `logits` (vocab,), given the tokens it
    has `said`: greedy below GREEDY_BELOW, else temperature and nucleus (top_p) sampling;
    OpenAI's frequency and presence penalties first lower the logits of tokens already said.

    Logits are made finite and bounded first (NaN to the bottom, +-inf and outliers
    clamped), probabilities come from a log-softmax, and a row whose probabilities are still
    not usable falls back to its argmax."""
    if said and (request.frequency_penalty or request.presence_penalty):
        ids = torch.tensor(said, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]]
        logits = logits - (
            counts * request.frequency_penalty + (counts > 0) * request.presence_penalty
        )
    # A new tensor: the bans below never touch the batch's logits.
    logits = logits.nan_to_num(nan=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)
    if banned := repeating(said, request.no_repeat_ngram):
        logits[list(banned)] = -LOGIT_BOUND
    if request.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.log_softmax(logits / request.temperature, dim=-1).exp()
    if not (torch.isfinite(probs).all() and probs.sum() > 0):
        return int(logits.argmax())
    if request.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=rng))
    kept, ids = nucleus(probs, request.top_p)
    return int(ids[torch.multinomial(kept, 1, generator=rng)])


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable tokens of `probs` whose mass before each is at most `top_p`, as
    (probabilities, token ids), most probable first.

    Only the top k are sorted, k doubling from `NUCLEUS_FIRST_K` until they hold more than
    `top_p`: every token past them then has more than `top_p` before it, so the set is the one
    a sort of the whole row gives, at a fraction of the cost (sorting a 49k vocabulary took
    ~9 ms a token, docs/benchmarks/generation.md)."""
    k = min(NUCLEUS_FIRST_K, probs.numel())
    while True:
        top, ids = probs.topk(k)
        # The stop test and the cut compare the same running sums in the row's own precision:
        # a `top_p` that rounds to 1.0 there (0.9999999999999999 in float32) keeps every token
        # whose mass before it does not pass 1.0, as a sort of the whole row does.
        mass = top.cumsum(-1)
        if k == probs.numel() or bool(mass[-1] > top_p):
            break
        k = min(2 * k, probs.numel())
    inside = mass - top <= top_p
    return top[inside], ids[inside]


def repeating(ids: list[int], n: int) -> set[int]:
    """Tokens that would make the last n-1 tokens of `ids` into an n-gram `ids` already holds."""
    if n < 1 or len(ids) < n - 1:
        return set()
    if n == 1:
        return set(ids)
    tail = ids[len(ids) - n + 1 :]
    return {ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == tail}
