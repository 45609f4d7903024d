"""The vllm engine's own bookkeeping (deployments/engines/vllm_engine.py), driven against a
scripted stand-in for vLLM's `LLMEngine` where vLLM cannot run (no CUDA): tokens to deltas,
stop strings, cancellation, and scoring calls that step past answers in flight. The real
engine runs in tests/unit/test_engine_vllm.py where CUDA and vllm exist."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest

from deployments.engines import loading
from deployments.engines.base import run_to_end
from serve_app.config import AppConfig, GeneratorConfig
from serve_app.contracts import GenerationRequest


class ScriptedLLM:
    """Each request answers with the tokens of its script, two per step; a request with
    `prompt_logprobs` finishes in one step with a log-probability per prompt token."""

    def __init__(self, scripts: dict[tuple, list[int]], tokenizer) -> None:
        self.scripts, self.tokenizer = scripts, tokenizer
        self.requests: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.model_config = SimpleNamespace(max_model_len=2048, dtype="torch.float16")

    def add_request(self, request_id, prompt, params) -> None:
        self.requests[request_id] = {
            "prompt": prompt["prompt_token_ids"],
            "params": params,
            "at": 0,
        }

    def abort_request(self, ids) -> None:
        for request_id in ids:
            self.aborted.append(request_id)
            self.requests.pop(request_id, None)

    def step(self):
        outputs = []
        for request_id, r in list(self.requests.items()):
            if r["params"].prompt_logprobs is not None:
                scored = [None] + [
                    {t: SimpleNamespace(logprob=-0.5 - i)} for i, t in enumerate(r["prompt"][1:])
                ]
                outputs.append(_output(request_id, [], "", True, "length", scored))
                del self.requests[request_id]
                continue
            script = self.scripts[tuple(r["prompt"])]
            r["at"] = min(r["at"] + 2, len(script))
            ids = script[: r["at"]]
            finished = r["at"] == len(script)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            outputs.append(_output(request_id, ids, text, finished, "stop" if finished else None))
            if finished:
                del self.requests[request_id]
        return outputs


def _output(request_id, ids, text, finished, reason, prompt_logprobs=None):
    completion = SimpleNamespace(token_ids=ids, text=text, finish_reason=reason)
    return SimpleNamespace(
        request_id=request_id,
        outputs=[completion],
        finished=finished,
        prompt_logprobs=prompt_logprobs,
    )


@pytest.fixture
def engine(monkeypatch):
    config = AppConfig()
    tokenizer = loading.load_tokenizer(config.generator, config.model_cache_dir)
    scripts: dict[tuple, list[int]] = {}
    fake = ModuleType("vllm")
    fake.SamplingParams = lambda **kw: SimpleNamespace(**{"prompt_logprobs": None, **kw})
    fake.EngineArgs = lambda **kw: SimpleNamespace(**kw)
    fake.LLMEngine = SimpleNamespace(from_engine_args=lambda args: ScriptedLLM(scripts, tokenizer))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from deployments.engines.vllm_engine import VllmEngine

    engine = VllmEngine(GeneratorConfig(engine="vllm"), config.model_cache_dir)
    engine.scripts = scripts
    return engine


def _ask(engine, content: str, answer: str, **settings):
    request = GenerationRequest(messages=[{"role": "user", "content": content}], **settings)
    sequence = engine.sequence(request)
    script = engine.tokenize([answer])[0] + [engine.tokenizer.eos_token_id]
    engine.scripts[tuple(sequence.prompt)] = script
    return sequence


def test_tokens_become_the_answer_with_its_ending(engine):
    a = _ask(engine, "First?", "The first answer has several words.", max_tokens=64)
    b = _ask(engine, "Second one?", "Short.", max_tokens=64)
    got = run_to_end(engine, [a, b])
    assert got == ["The first answer has several words.", "Short."]
    assert a.delta.finish_reason == "stop" and b.delta.finish_reason == "stop"
    assert a.delta.completion_tokens == len(engine.tokenize([got[0]])[0]) + 1  # and the eos


def test_a_stop_string_ends_the_answer_and_the_request(engine):
    s = _ask(engine, "Stop?", "Keep this. STOP and not this.", max_tokens=64, stop=["STOP"])
    assert run_to_end(engine, [s]) == ["Keep this. "]
    assert s.delta.finish_reason == "stop"
    assert s.engine.request_id in engine.llm.aborted  # vLLM stops decoding it


def test_a_cancelled_sequence_leaves_at_the_next_step(engine):
    s = _ask(engine, "Long?", "one two three four five six seven eight nine ten", max_tokens=64)
    engine.add([s])
    engine.step()
    s.abandoned = True
    engine.step()
    assert s.delta.finish_reason == "cancelled" and not engine.in_flight()
    assert s.engine.request_id in engine.llm.aborted


def test_scoring_between_steps_loses_no_answer_tokens(engine):
    s = _ask(
        engine, "Scored?", "An answer that keeps streaming while rows are scored.", max_tokens=64
    )
    engine.add([s])
    engine.step()
    text = s.delta.text
    rows = engine.tokenize(["the cat sat", "a longer row of tokens"])
    scores = engine.logprobs(rows, [2, 3])
    assert [len(r) for r in scores] == [2, 3] and all(v < 0 for r in scores for v in r)
    while engine.in_flight():
        engine.step()
        text += s.delta.text
    assert text == "An answer that keeps streaming while rows are scored."


def test_an_answer_that_ends_during_scoring_still_ends(engine):
    s = _ask(engine, "Brief?", "Done now.", max_tokens=64)  # ends on vLLM's second step
    engine.add([s])
    engine.step()
    text = s.delta.text
    engine.logprobs(engine.tokenize(["one row"]), [1])  # vLLM finishes the answer here
    engine.step()
    text += s.delta.text
    assert text == "Done now." and s.delta.finish_reason == "stop"
    assert not engine.in_flight()
