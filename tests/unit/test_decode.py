"""The generator's decode loop with a tiny random LM: one sequence's failure stays its own."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deployments.batching import BatchedModel
from deployments.generator import Generator, _Admission
from serve_app.contracts import Delta, GenerationRequest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


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
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, LlamaForCausalLM(config).eval()


def generator(tiny, max_batch_size: int = 8) -> Generator:
    """A Generator over the tiny model, without Serve: its decode loop driven directly."""
    g = object.__new__(Generator.func_or_class)
    BatchedModel.__init__(g)
    g.device = "cpu"
    g._bind(*tiny)
    g.eos_ids = set()  # a random model: every sequence runs to its max_tokens
    g.max_batch_size, g.max_batch_tokens = max_batch_size, 100_000
    return g


def request(content: str, max_tokens: int = 12, **sampling) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **sampling
    )


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
    admissions = [_Admission([g._sequence(r) for r in batch]) for batch in batches]
    g.waiting.extend(admissions)
    await g._decode_loop()
    return [await outcomes(a) for a in admissions]


def alone(tiny, req: GenerationRequest) -> str:
    ((text,),) = asyncio.run(run(generator(tiny), [req]))
    assert isinstance(text, str)
    return text


def test_a_sequence_that_raises_in_a_step_fails_alone(tiny, monkeypatch):
    g = generator(tiny)
    advance = g._advance

    def poisoned(sequence, token):
        if sequence.request.messages[0]["content"] == "poison" and len(sequence.ids) >= 3:
            raise ValueError("cannot detokenize")
        return advance(sequence, token)

    monkeypatch.setattr(g, "_advance", poisoned)
    healthy = [request("hello there"), request("a longer question, padded less", max_tokens=20)]
    ((first, bad, second), (other,)) = asyncio.run(
        run(g, [healthy[0], request("poison"), healthy[1]], [request("another client")])
    )
    assert isinstance(bad, ValueError)
    # The others decoded to their full budget, exactly as they would have alone.
    assert first == alone(tiny, healthy[0])
    assert second == alone(tiny, healthy[1])
    assert other == alone(tiny, request("another client"))
    assert g.state is None and not g.running and not g.waiting


def test_a_hostile_temperature_samples_greedily_beside_others(tiny):
    greedy = alone(tiny, request("the same prompt"))
    g = generator(tiny)
    hostile = [
        request("the same prompt", temperature=1e-45, seed=7),
        request("the same prompt", temperature=5e-324, top_p=1e-300, seed=-(2**63)),
    ]
    ((a, b), (c,)) = asyncio.run(
        run(g, hostile, [request("the same prompt", temperature=2.0, seed=2**64 - 1)])
    )
    assert a == greedy and b == greedy
    assert isinstance(c, str) and c  # sampled at the top temperature, beside them


def test_a_failed_prefill_fails_only_its_own_requests(tiny, monkeypatch):
    g = generator(tiny)
    prefill = g._prefill

    def failing(sequences):
        if any(s.request.messages[0]["content"] == "poison" for s in sequences):
            raise RuntimeError("prefill failed")
        return prefill(sequences)

    monkeypatch.setattr(g, "_prefill", failing)
    (ok,), (bad,) = asyncio.run(run(g, [request("hello there")], [request("poison")]))
    assert ok == alone(tiny, request("hello there"))
    assert isinstance(bad, RuntimeError)


def test_a_failed_decode_pass_fails_those_in_flight_and_the_loop_goes_on(tiny):
    # One sequence per batch: the second waits while the first decodes.
    g = generator(tiny, max_batch_size=1)
    model, calls = g.model, {"decode": 0}

    def flaky(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step, not a prefill
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("device error")
        return model(*args, **kwargs)

    g.model = flaky
    (failed,), (waited,) = asyncio.run(run(g, [request("first")], [request("second")]))
    assert isinstance(failed, RuntimeError)
    assert waited == alone(tiny, request("second"))
    # And the next request after it is served as usual.
    ((later,),) = asyncio.run(run(g, [request("later")]))
    assert later == alone(tiny, request("later"))
