"""The Classify deployment's cascade with stand-in handles, and the generator's constrained
choice with a scripted model: no Ray cluster."""

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from deployments import generator as generator_module
from deployments.generator import Generator
from serve_app import cascade
from serve_app.config import AppConfig, InputLimits
from serve_app.contracts import Choice
from serve_app.pipelines.classify import Classify, label_vectors, split_vectors
from serve_app.protocol import limits
from serve_app.protocol.classify import ClassifyRequest
from serve_app.protocol.errors import APIError

DIM = 8


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


class Method:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    async def remote(self, *args):
        self.calls.append(args)
        return self.fn(*args)


class Embedder:
    """Label "a" is axis 0, label "b" axis 1; an input "k:<x>" sits at angle x toward b."""

    def __init__(self) -> None:
        self.embed = Method(self._embed)

    @staticmethod
    def _vector(text: str) -> np.ndarray:
        if text.startswith("k:"):
            x = float(text.split(":")[1].split()[0])
            return unit(np.cos(x), np.sin(x))
        return {"a": unit(1), "b": unit(0, 1)}.get(text, unit(0, 0, 1))

    def _embed(self, texts: list[str]):
        vectors = np.stack([self._vector(t) for t in texts])
        return SimpleNamespace(vectors=vectors, model="stand-in")


@pytest.fixture(autouse=True)
def uncalibrated(tmp_path, monkeypatch):
    """No calibration recorded for the model pair, whatever ships."""
    monkeypatch.setattr(cascade, "CALIBRATIONS", tmp_path / "none.json")


def classifier(answer: Choice | None = None, **classify) -> tuple[Classify, Method]:
    choose = Method(lambda messages, names, budget: answer or Choice([0.1, 0.9]))
    config = AppConfig(classify=classify)
    replica = Classify.func_or_class(Embedder(), SimpleNamespace(choose=choose), config)
    return replica, choose


def run(replica: Classify, **body):
    return asyncio.run(replica.classify(ClassifyRequest(labels=["a", "b"], **body)))


# Angles from near "a" (sure) to the middle (unsure).
INPUTS = [f"k:{x}" for x in (0.1, 0.7, 0.75, 0.78, 0.2)]


def test_escalation_is_capped_per_request_and_the_least_sure_go_first():
    replica, choose = classifier(max_escalated=2)
    answer = run(replica, inputs=INPUTS, escalate="always")
    assert answer.escalated == 2 and len(choose.calls) == 2 and answer.skipped == 3
    decided = {r.index: r for r in answer.data}
    # The two closest to the middle (0.78, 0.75) went to the generator.
    assert decided[3].decided_by == decided[2].decided_by == "llm"
    for i in (0, 1, 4):
        assert decided[i].decided_by == "embedding" and decided[i].skipped == "max_escalated"
        assert decided[i].label == "a" and decided[i].escalated == "always"


@pytest.mark.parametrize("reason", ["busy", "prompt_too_long"])
def test_a_refused_choice_keeps_the_fast_answer_and_says_why(reason):
    replica, _ = classifier(Choice(None, reason))
    answer = run(replica, inputs=["k:0.7"], escalate="always")
    (result,) = answer.data
    assert result.decided_by == "embedding" and result.skipped == reason
    assert result.label == "a" and answer.escalated == 0 and answer.skipped == 1


def test_uncalibrated_auto_escalates_nothing_not_even_contrast_markers():
    # Without a calibration that found the generator better, the threshold is 0.
    replica, choose = classifier()
    answer = run(replica, inputs=["k:0.78", "k:0.1 but not quite"])
    assert answer.escalated == 0 and not choose.calls
    assert all(r.escalated is None for r in answer.data)


def test_configured_threshold_and_markers_still_escalate():
    replica, choose = classifier(threshold=0.6, contrast_languages=["en"])
    assert not choose.calls
    answer = run(replica, inputs=["k:0.78", "k:0.1 but not quite", "k:0.1"])
    assert [r.escalated for r in answer.data] == ["low_confidence", "contrast_marker", None]
    assert answer.escalated == 2 and len(choose.calls) == 2


def test_examples_move_a_label_toward_them():
    request = ClassifyRequest(
        inputs=["k:0.7"], labels={"a": ["a", "a"], "b": "b"}, examples={"b": ["k:0.6"]}
    )
    texts, labels = split_vectors(request, Embedder()._embed(request_texts(request)).vectors)
    assert texts.shape == (1, DIM) and labels.shape == (2, DIM)
    assert np.allclose(labels[0], unit(1))  # two copies of one description: the same vector
    plain = label_vectors([unit(0, 1)[None]], [None])[0]
    assert float(texts[0] @ labels[1]) > float(texts[0] @ plain)  # closer with the example


def request_texts(request: ClassifyRequest) -> list[str]:
    return list(request.inputs) + request.descriptions + request.example_texts


def test_examples_must_name_known_labels():
    with pytest.raises(ValidationError):
        ClassifyRequest(inputs=["x"], labels=["a", "b"], examples={"c": ["y"]})
    with pytest.raises(ValidationError):
        ClassifyRequest(inputs=["x"], labels={"a": [], "b": "b"})


def test_choices_wait_on_their_own_lane_and_a_full_queue_answers_busy():
    release = threading.Event()

    def blocked(messages, options, budget):
        release.wait(10)
        return Choice([1.0])

    fake = SimpleNamespace(_choose=blocked)

    async def scenario():
        waiting = [
            asyncio.create_task(Generator.func_or_class.choose(fake, [], ["x"], 64))
            for _ in range(generator_module.CHOICE_QUEUE)
        ]
        await asyncio.sleep(0.05)
        # The decode loop's forward passes run through asyncio.to_thread: still free.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 2) == "free"
        refused = await Generator.func_or_class.choose(fake, [], ["x"], 64)
        release.set()
        return refused, await asyncio.gather(*waiting)

    refused, answered = asyncio.run(scenario())
    assert refused == Choice(None, "busy")
    assert all(a == Choice([1.0]) for a in answered)


def test_label_texts_and_examples_count_toward_the_input_limits():
    request = ClassifyRequest(
        inputs=["x"], labels={"a": ["a1", "a2"], "b": "b"}, examples={"a": ["e"]}
    )
    limits.check_classify(request, InputLimits(max_inputs=5), max_labels=8)
    with pytest.raises(APIError) as refused:  # 1 input + 3 descriptions + 1 example
        limits.check_classify(request, InputLimits(max_inputs=4), max_labels=8)
    assert refused.value.status == 400 and refused.value.body.code == "too_many_inputs"
    long = ClassifyRequest(inputs=["x"], labels=["a", "b"], examples={"a": ["y" * 101]})
    with pytest.raises(APIError) as refused:
        limits.check_classify(long, InputLimits(max_input_chars=100), max_labels=8)
    assert refused.value.body.param == "examples.0"
