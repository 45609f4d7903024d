"""The engines package: Ray-free at run time, the registry, and constrained choice over the
engine contract (with the tiny random Llama of test_decode)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deployments import engines
from deployments.engines import choice, loading
from deployments.engines.hf import TransformersEngine
from serve_app.config import AppConfig, GeneratorConfig
from serve_app.contracts import Choice
from tests.unit.test_decode import tiny  # noqa: F401  (a fixture)

ENGINES = Path(engines.__file__).parent
MODULES = sorted(f"deployments.engines.{p.stem}" for p in ENGINES.glob("*.py"))
MESSAGES = [{"role": "user", "content": "Which one?"}]


def test_no_engines_module_brings_ray_in_when_imported():
    """Imports at run time, transitive ones included (a static read of the imports sees only
    each file's own): each module in a fresh interpreter, in turn, must leave Ray out."""
    script = (
        "import importlib, sys\n"
        f"for name in {['deployments.engines', *MODULES]!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name.startswith(('deployments', 'serve_app')):\n"
        "            raise\n"
        "        print('unavailable', name, exc.name)\n"  # an optional engine's library
        "        continue\n"
        "    if 'ray' in sys.modules:\n"
        "        print('RAY', name)\n"
        "        break\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert "deployments.engines.hf" in MODULES and "deployments.engines.embedding" in MODULES
    assert "RAY" not in done.stdout, done.stdout


def test_the_registry_loads_the_named_engine_and_says_why_it_cannot(monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr(
        TransformersEngine, "__init__", lambda self, config, cache_dir: loaded.append(config)
    )
    monkeypatch.setattr(TransformersEngine, "info", lambda self: {}, raising=False)
    engine, chosen = engines.load_engine(GeneratorConfig(engine="transformers"), tmp_path)
    assert isinstance(engine, TransformersEngine) and [c.engine for c in loaded] == ["transformers"]
    assert chosen.report("transformers")["engine_reason"] == "named in the configuration"
    with pytest.raises(engines.EngineUnavailable, match="not a GGUF"):
        engines.load_engine(GeneratorConfig(engine="llama.cpp", model="gpt2"), tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # the binding does not import
    with pytest.raises(engines.EngineUnavailable, match="llama-cpp-python"):
        engines.load_engine(GeneratorConfig(engine="llama.cpp"), tmp_path)
    # auto with only transformers able to run: no measurement, and the reason says why.
    engine, chosen = engines.load_engine(GeneratorConfig(engine="auto"), tmp_path)
    assert isinstance(engine, TransformersEngine)
    assert "llama-cpp-python is not installed" in chosen.reason


def test_auto_weighs_the_whole_answer_a_user_waits_for():
    """A 12x faster prompt read does not make up for decoding at a third of the speed (a
    bf16 engine on matrix units against GGUF kernels), but it wins when decoding is close."""
    decoder = engines.EngineTrial("llama.cpp", 42.0, 140.0, None, 300.0, full_sequences=8)
    reader = engines.EngineTrial("transformers", 15.0, 90.0, None, 3600.0, full_sequences=8)
    assert decoder.wait_s() < reader.wait_s()
    waits = decoder.waits_s()
    assert waits is not None and waits["rag"] == pytest.approx(750 / 300 + 64 / 42)
    assert waits["busy"] == pytest.approx(8 * 40 / 300 + 64 / (140 / 8))
    close_reader = engines.EngineTrial("transformers", 38.0, 150.0, None, 3600.0, full_sequences=8)
    assert close_reader.wait_s() < decoder.wait_s()
    assert engines.EngineTrial("x", 42.0, 140.0).wait_s() == math.inf  # a shape not measured


def test_auto_keeps_the_fastest_engine_measured_once_per_machine(monkeypatch, tmp_path):
    rates = {"llama.cpp": (90.0, 150.0, 400.0), "transformers": (25.0, 180.0, 600.0)}
    closed, measured = [], []

    def load(name, config, cache_dir):
        return SimpleNamespace(
            name=name, info=lambda: {"engine": name}, close=lambda: closed.append(name)
        )

    def trial(name, engine, config):
        measured.append(name)
        one, full, prefill = rates[name]
        return engines.EngineTrial(name, one, full, None, prefill, full_sequences=8)

    monkeypatch.setattr(engines, "_load", load)
    monkeypatch.setattr(engines, "_trial", trial)
    monkeypatch.setattr(
        engines, "candidates", lambda config: {"llama.cpp": None, "transformers": None}
    )
    first, chosen = engines.load_engine(GeneratorConfig(), tmp_path)
    # Waits 1.8 s against 3.1 s: llama.cpp decodes one stream 3.6x as fast, and transformers'
    # better prompt read and batch do not make up for it.
    assert first.name == "llama.cpp" and closed == ["transformers"]
    assert measured == ["llama.cpp", "transformers"] * engines.TRIAL_ROUNDS
    info = chosen.report("auto")
    assert (
        info["engine"] == "llama.cpp"
        and info["engine_measured"]
        and [t["engine"] for t in info["engine_trials"]]
        == [
            "llama.cpp",
            "transformers",
        ]
    )
    measured.clear()
    again, chosen = engines.load_engine(GeneratorConfig(), tmp_path)
    assert again.name == "llama.cpp" and measured == []  # read from the earlier measurement
    assert not chosen.measured and "(earlier)" in chosen.reason


def test_each_generator_gets_the_engine_of_its_own_answers_from_one_measurement(
    monkeypatch, tmp_path
):
    """Rates as measured on a 2-core AMX Xeon: llama.cpp decodes a stream 3.7x as fast,
    transformers' bf16 reads a prompt 4.9x as fast. Chat's Generator keeps llama.cpp, RAG's
    (long prompts) transformers, and the second reads the first one's trials."""
    rates = {"llama.cpp": (32.3, 53.3, 163.1), "transformers": (8.7, 63.8, 801.8)}
    measured = []

    def trial(name, engine, config):
        measured.append(name)
        one, full, prefill = rates[name]
        return engines.EngineTrial(name, one, full, None, prefill, full_sequences=8)

    monkeypatch.setattr(
        engines, "_load", lambda name, config, cache_dir: SimpleNamespace(name=name)
    )
    monkeypatch.setattr(engines, "_trial", trial)
    monkeypatch.setattr(
        engines, "candidates", lambda config: {"llama.cpp": None, "transformers": None}
    )
    chat, chosen = engines.load_engine(GeneratorConfig(), tmp_path, "chat")
    assert (
        chat.name == "llama.cpp" and chosen.measured and len(measured) == 2 * engines.TRIAL_ROUNDS
    )
    assert set(chosen.report("auto")["engine_trials"][0]["waits_s"]) == {"chat", "busy"}
    measured.clear()
    rag, chosen = engines.load_engine(GeneratorConfig(), tmp_path, "rag")
    assert rag.name == "transformers" and measured == [] and not chosen.measured
    report = chosen.report("auto")
    assert report["engine_answers"] == ["rag", "rag_first_token"]
    # Its whole answer comes ~25% later, its first token 4.4x sooner.
    waits = {t["engine"]: t["waits_s"] for t in report["engine_trials"]}
    assert waits["transformers"]["rag"] < 1.3 * waits["llama.cpp"]["rag"]
    assert waits["transformers"]["rag_first_token"] * 4 < waits["llama.cpp"]["rag_first_token"]
    # One Generator for every route weighs all three answers: llama.cpp.
    every, _ = engines.load_engine(GeneratorConfig(), tmp_path, "all")
    assert every.name == "llama.cpp" and measured == []


@pytest.fixture(scope="module")
def engine(tiny) -> TransformersEngine:  # noqa: F811
    return TransformersEngine.from_model(*tiny)


def reference_logprob(engine: TransformersEngine, prompt: list[int], answer: list[int]) -> float:
    """log P(answer | prompt) from one plain forward pass over the whole row, no padding."""
    row = torch.tensor([prompt + answer])
    with torch.inference_mode():
        logits = engine.model(input_ids=row).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    targets = row[0, 1:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked[-len(answer) :].sum().item()


def test_logprobs_of_rows_of_different_lengths_match_a_plain_forward_pass(engine):
    rows = [engine.tokenize(["a short row"])[0], engine.tokenize(["a much longer row here"])[0]]
    tails = [3, 5]
    got = engine.logprobs(rows, tails)
    assert [len(r) for r in got] == tails
    for row, tail, values in zip(rows, tails, got, strict=True):
        expected = reference_logprob(engine, row[:-tail], row[-tail:])
        assert math.isclose(sum(values), expected, rel_tol=1e-4, abs_tol=1e-4)


def test_choose_scores_each_option_as_the_whole_reply(engine):
    options = ["bug", "bug report", "feature"]
    got = choice.choose(engine, MESSAGES, options, 1024)
    prompt = engine.chat_prompt(MESSAGES)
    assert engine.end_of_turn == [engine.tokenizer.eos_token_id]
    totals = [
        reference_logprob(engine, prompt, ids + engine.end_of_turn)
        for ids in engine.tokenize(options)
    ]
    expected = torch.softmax(torch.tensor(totals, dtype=torch.float64), dim=0).tolist()
    assert got.skipped is None and len(got.probabilities) == 3
    assert math.isclose(sum(got.probabilities), 1.0, rel_tol=1e-9)
    for p, q in zip(got.probabilities, expected, strict=True):
        assert math.isclose(p, q, rel_tol=1e-3, abs_tol=1e-6)


def test_choose_refuses_a_prompt_over_its_budget(engine):
    prompt = len(engine.chat_prompt(MESSAGES))
    longest = len(engine.tokenize(["feature"])[0]) + 1  # and the end of the turn
    assert choice.choose(engine, MESSAGES, ["bug", "feature"], prompt + longest - 1) == Choice(
        None, "prompt_too_long"
    )
    assert choice.choose(engine, MESSAGES, ["bug", "feature"], prompt + longest).skipped is None


class Scripted(torch.nn.Module):
    """A causal LM that, after each token of `script`, predicts the one that follows it."""

    def __init__(self, script: list[int], vocab: int, eos: int) -> None:
        super().__init__()
        self.next = torch.zeros(vocab, dtype=torch.long)
        for a, b in itertools.pairwise(script):
            self.next[a] = b
        self.vocab = vocab
        self.config = SimpleNamespace(max_position_embeddings=2048)
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids, logits_to_keep=None, **_):
        predicted = self.next[input_ids[:, -(logits_to_keep or input_ids.shape[1]) :]]
        logits = torch.zeros(*predicted.shape, self.vocab)
        logits.scatter_(-1, predicted.unsqueeze(-1), 30.0)
        return SimpleNamespace(logits=logits)


def test_choose_picks_the_whole_reply_not_its_beginning():
    """The model always replies "bug report": the option "bug" is only its beginning, and
    the end of the turn after it is what tells the two apart."""
    config = AppConfig()
    tokenizer = loading.load_tokenizer(config.generator, config.model_cache_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    last = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    script = [last, *tokenizer("bug report", add_special_tokens=False)["input_ids"]]
    script.append(tokenizer.eos_token_id)
    model = Scripted(script, len(tokenizer), tokenizer.eos_token_id)
    scripted = TransformersEngine.from_model(tokenizer, model)
    got = choice.choose(scripted, MESSAGES, ["bug", "bug report"], 1024)
    assert got.skipped is None and got.probabilities[1] > 0.99
