"""The vllm engine through the engine contract: only where CUDA and vllm both exist."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
    pytest.skip("the vllm engine needs CUDA and the vllm extra", allow_module_level=True)

from deployments.engines import candidates, load_engine  # noqa: E402
from deployments.engines.base import run_to_end  # noqa: E402
from serve_app.config import GeneratorConfig  # noqa: E402
from serve_app.contracts import GenerationRequest  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    config = GeneratorConfig(engine="vllm", num_gpus=0.3)
    assert candidates(config)["vllm"] is None
    engine, choice = load_engine(config, tmp_path_factory.mktemp("models"))
    assert choice.engine == "vllm"
    yield engine
    engine.reset()


def test_greedy_answers_alone_and_batched_agree(engine):
    asks = [
        GenerationRequest(messages=[{"role": "user", "content": f"Count to {k}."}], max_tokens=12)
        for k in (3, 5, 7)
    ]
    alone = [run_to_end(engine, [engine.sequence(r)])[0] for r in asks]
    together = run_to_end(engine, [engine.sequence(r) for r in asks])
    assert all(alone) and alone == together


def test_budget_and_stop_strings_end_the_answer(engine):
    ask = GenerationRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=5)
    s = engine.sequence(ask)
    run_to_end(engine, [s])
    assert s.delta.finish_reason in ("stop", "length") and len(s.ids) <= 5


def test_abandoned_sequence_leaves(engine):
    ask = GenerationRequest(messages=[{"role": "user", "content": "Tell a story."}], max_tokens=64)
    s = engine.sequence(ask)
    engine.add([s])
    engine.step()
    s.abandoned = True
    engine.step()
    assert s.done and not engine.in_flight()


def test_logprobs_match_the_prompt_tokens(engine):
    rows = engine.tokenize(["The cat sat on the mat.", "Paris is the capital of France."])
    scores = engine.logprobs(rows, [3, 4])
    assert [len(r) for r in scores] == [3, 4]
    assert all(v <= 0.0 for r in scores for v in r)
