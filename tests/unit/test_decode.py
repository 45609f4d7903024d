"""The transformers engine's decode state, and the Generator's decode loop over it, with a
tiny random Llama built here (no weights): merge, trim, per-row sampling, stop strings,
budgets, and one sequence's failure staying its own."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deployments.batching import BatchedModel
from deployments.engines import hf
from deployments.engines.base import Sequence
from deployments.engines.hf import TransformersEngine
from deployments.generator import Generator, _Admission
from serve_app.config import GeneratorConfig
from serve_app.contracts import Delta, GenerationRequest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONTEXT = 256


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, no merges: 256 byte tokens and a few special ones."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def tiny() -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, LlamaForCausalLM(config).eval()


def engine(tiny) -> TransformersEngine:
    e = TransformersEngine.from_model(*tiny)
    e.eos_ids = set()  # a random model: every sequence runs to its max_tokens (or a stop)
    return e


def request(content: str, max_tokens: int = 12, **sampling) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **sampling
    )


def decode(
    e: TransformersEngine, *batches: tuple[int, list[GenerationRequest]]
) -> list[list[Delta | Exception]]:
    """Add each batch of requests before the step it names (0: the first) and step until
    nothing is in flight; per request, in the batches' order, what each step gave it."""
    sequences: list[Sequence] = []
    histories: list[list[Delta | Exception]] = []
    joins = sorted(batches, key=lambda b: b[0])
    step = 0
    while joins or e.in_flight():
        while joins and joins[0][0] <= step:
            new = [e.sequence(r) for r in joins.pop(0)[1]]
            e.add(new)
            sequences += new
            histories += [[] for _ in new]
        e.step()
        for s, history in zip(sequences, histories, strict=True):
            if history and ended(history[-1]):
                continue
            if s.error is not None:
                history.append(s.error)
            elif s.delta is not None:
                history.append(s.delta)
        step += 1
    return histories


def ended(item: Delta | Exception) -> bool:
    return isinstance(item, Exception) or bool(item.finish_reason)


def text(history: list[Delta | Exception]) -> str:
    return "".join(d.text for d in history if isinstance(d, Delta))


def alone(tiny, req: GenerationRequest) -> list[Delta | Exception]:
    (history,) = decode(engine(tiny), (0, [req]))
    return history


def test_a_budget_ends_the_answer_and_the_counts_add_up(tiny):
    history = alone(tiny, request("hello there", max_tokens=5))
    last = history[-1]
    assert isinstance(last, Delta) and last.finish_reason == "length"
    assert last.completion_tokens == 5 and last.prompt_tokens > 0
    assert all(d.finish_reason is None for d in history[:-1])


def test_a_prompt_over_the_window_keeps_its_latest_tokens(tiny):
    e = engine(tiny)
    s = e.sequence(request("x" * 400, max_tokens=16))
    assert len(s.prompt) == CONTEXT - 16 and s.dropped > 0
    full = e.chat_prompt([{"role": "user", "content": "x" * 400}])
    assert s.prompt == full[-(CONTEXT - 16) :] and s.dropped == len(full) - len(s.prompt)


def test_sequences_joining_mid_decode_decode_as_they_would_alone(tiny):
    first, second, third = (
        request("a long first question, padded least of all", max_tokens=10),
        request("short", max_tokens=14),
        request("a third one", max_tokens=6),
    )
    together = decode(engine(tiny), (0, [first]), (3, [second, third]))
    assert [text(h) for h in together] == [
        text(alone(tiny, first)),
        text(alone(tiny, second)),
        text(alone(tiny, third)),
    ]


def test_merge_left_pads_the_shorter_state_and_trim_drops_shared_padding(tiny):
    e = engine(tiny)
    long, short = request("a much longer prompt than the other", 3), request("hi", 8)
    e.add([e.sequence(long)])
    e.step()
    width = e.state.mask.shape[1]
    e.add([e.sequence(short)])
    state = e.state
    # The short one joined left-padded to the long one's width; caches match the mask.
    assert state.mask.shape == (2, width)
    assert state.mask[1, 0] == 0 and state.mask[1, -1] == 1 and state.mask[0].all()
    assert all(layer.keys.shape[-2] == width for layer in state.cache.layers)
    while len(e.in_flight()) == 2:
        e.step()
    # The long one left: the columns only it used are gone.
    ((remaining,),) = [e.in_flight()]
    assert remaining.request is short
    assert e.state.mask.all() and e.state.mask.shape[1] < width  # no padding left at all
    assert all(layer.keys.shape[-2] == e.state.mask.shape[1] for layer in e.state.cache.layers)


def finished(e: TransformersEngine, *requests: GenerationRequest) -> list[Sequence]:
    """`requests` decoded together to their end; their sequences, ids included."""
    sequences = [e.sequence(r) for r in requests]
    e.add(sequences)
    while e.in_flight():
        e.step()
    return sequences


def test_each_row_samples_with_its_own_settings(tiny):
    greedy = request("the same prompt", max_tokens=16)
    no_repeat = request("the same prompt", max_tokens=16, no_repeat_ngram=1)
    sampled = request("the same prompt", max_tokens=16, temperature=2.0, seed=3)
    (reference,) = finished(engine(tiny), greedy)
    assert len(set(reference.ids)) < len(reference.ids)  # greedy alone repeats itself
    plain, unrepeated, hot = finished(engine(tiny), greedy, no_repeat, sampled)
    assert plain.ids == reference.ids  # its neighbours' settings never reach its row
    assert len(unrepeated.ids) == len(set(unrepeated.ids)) == 16  # no token said twice
    assert hot.ids != reference.ids
    assert hot.ids == finished(engine(tiny), sampled)[0].ids  # a seed repeats its samples


def test_a_stop_string_ends_the_answer_where_it_begins_and_is_never_sent(tiny):
    full = text(alone(tiny, request("stop me", max_tokens=20)))
    stop = full[6:8]
    assert len(stop) == 2
    cut = full.find(stop)
    history = alone(tiny, request("stop me", max_tokens=20, stop=(stop,)))
    assert text(history) == full[:cut]
    assert history[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in history)


def test_a_sequence_that_raises_in_a_step_fails_alone(tiny, monkeypatch):
    advance = hf.advance

    def poisoned(sequence, token, eos_ids, decode):
        if sequence.request.messages[0]["content"] == "poison" and len(sequence.ids) >= 3:
            raise ValueError("cannot detokenize")
        return advance(sequence, token, eos_ids, decode)

    monkeypatch.setattr(hf, "advance", poisoned)
    healthy = [request("hello there"), request("a longer question, padded less", max_tokens=20)]
    e = engine(tiny)
    first, bad, second = decode(e, (0, [healthy[0], request("poison"), healthy[1]]))
    assert isinstance(bad[-1], ValueError) and len(bad) == 4
    monkeypatch.setattr(hf, "advance", advance)
    assert text(first) == text(alone(tiny, healthy[0]))
    assert text(second) == text(alone(tiny, healthy[1]))
    assert not e.in_flight()


# The Generator deployment's loop over the engine, without Serve.


def generator(tiny, max_batch_size: int = 8) -> Generator:
    g = object.__new__(Generator.func_or_class)
    BatchedModel.__init__(g, GeneratorConfig().batching)
    g._drive(engine(tiny))
    g.max_batch_size, g.max_batch_tokens = max_batch_size, 100_000
    return g


async def outcomes(admission: _Admission) -> list[str | Exception]:
    """Per sequence of `admission`: its whole text, or the exception it ended with."""
    texts: list[str | Exception] = [""] * len(admission.sequences)
    while (out := await admission.outputs.get()) is not None:
        if isinstance(out, BaseException):  # the whole admission failed
            return [out] * len(texts)
        for k, item in enumerate(out):
            if isinstance(item, Delta) and not isinstance(texts[k], Exception):
                texts[k] += item.text
            elif isinstance(item, Exception):
                texts[k] = item
    return texts


async def run(g: Generator, *batches: list[GenerationRequest]) -> list[list[str | Exception]]:
    """Submit each batch as one admission (as `@serve.batch` would) and decode them all."""
    admissions = [_Admission([g.engine.sequence(r) for r in batch]) for batch in batches]
    g.waiting.extend(admissions)
    await g._decode_loop()
    return [await outcomes(a) for a in admissions]


def served_alone(tiny, req: GenerationRequest) -> str:
    ((answer,),) = asyncio.run(run(generator(tiny), [req]))
    assert isinstance(answer, str)
    return answer


def test_the_loop_answers_as_the_engine_does_and_batches_do_not_mix(tiny):
    reqs = [request("hello there"), request("another client", max_tokens=20)]
    ((a,), (b,)) = asyncio.run(run(generator(tiny), [reqs[0]], [reqs[1]]))
    assert a == text(alone(tiny, reqs[0])) and b == text(alone(tiny, reqs[1]))


def test_each_token_goes_out_before_the_forward_pass_after_it(tiny):
    """The loop streams what `sample` gave before `forward` runs: the first token straight
    after the prompt's own pass, and every later one a pass sooner than after a whole step."""
    g = generator(tiny)
    admission = _Admission([g.engine.sequence(request("hello there", max_tokens=5))])
    g.waiting.append(admission)
    forward, published = g.engine.forward, []

    def recording() -> None:
        published.append(admission.outputs.qsize())
        forward()

    g.engine.forward = recording
    asyncio.run(g._decode_loop())
    # Before the k-th pass, k tokens were out; before the last, the 5th and the end marker.
    assert published == [1, 2, 3, 4, 6]
    assert asyncio.run(outcomes(admission)) == [served_alone(tiny, request("hello there", 5))]


def test_a_hostile_temperature_samples_greedily_beside_others(tiny):
    greedy = served_alone(tiny, request("the same prompt"))
    hostile = [
        request("the same prompt", temperature=1e-45, seed=7),
        request("the same prompt", temperature=5e-324, top_p=1e-300, seed=-(2**63)),
    ]
    ((a, b), (c,)) = asyncio.run(
        run(generator(tiny), hostile, [request("the same prompt", temperature=2.0, seed=2**64 - 1)])
    )
    assert a == greedy and b == greedy
    assert isinstance(c, str) and c  # sampled at the top temperature, beside them


def test_a_failed_prefill_fails_only_its_own_requests(tiny, monkeypatch):
    g = generator(tiny)
    prefill = g.engine._prefill

    def failing(sequences):
        if any(s.request.messages[0]["content"] == "poison" for s in sequences):
            raise RuntimeError("prefill failed")
        return prefill(sequences)

    monkeypatch.setattr(g.engine, "_prefill", failing)
    (ok,), (bad,) = asyncio.run(run(g, [request("hello there")], [request("poison")]))
    assert ok == served_alone(tiny, request("hello there"))
    assert isinstance(bad, RuntimeError)


def test_a_failed_decode_pass_fails_those_in_flight_and_the_loop_goes_on(tiny):
    # One sequence per batch: the second waits while the first decodes.
    g = generator(tiny, max_batch_size=1)
    model, calls = g.engine.model, {"decode": 0}

    def flaky(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step, not a prefill
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("device error")
        return model(*args, **kwargs)

    g.engine.model = flaky
    (failed,), (waited,) = asyncio.run(run(g, [request("first")], [request("second")]))
    assert isinstance(failed, RuntimeError)
    assert waited == served_alone(tiny, request("second"))
    # And the next request after it is served as usual.
    ((later,),) = asyncio.run(run(g, [request("later")]))
    assert later == served_alone(tiny, request("later"))
    assert not g.engine.in_flight() and not g.running and not g.waiting
