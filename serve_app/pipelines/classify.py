"""The classify route's deployment: a confidence cascade.

Every input is scored against each label's vector by embedding similarity (a softmax over
cosines at a fitted temperature). A label's vector is the mean of its descriptions' embeddings
and, when the request gives labelled examples, of theirs (few-shot by embedding). Under
`escalate: auto`, an input whose top probability is under the threshold, or that holds a
contrast marker of an enabled language, goes to the generator, which must answer with one of
the labels (`Generator.choose`). The threshold and the markers come from a calibration per
model pair (serve_app/cascade.py): where the generator is not measured to be better, `auto`
escalates nothing.

What one request may ask of the generator is bounded: at most `max_escalated` inputs, each
prompt within `max_prompt_tokens`, and the generator's choice lane refuses work when its queue
is full. Inputs past a bound keep their fast-path answer, with `skipped` saying why.
"""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.cascade import decision
from serve_app.config import AppConfig, ClassifyConfig
from serve_app.contracts import Choice
from serve_app.metrics import classify_metrics
from serve_app.protocol.classify import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
)

INSTRUCTION = (
    "Classify the text into exactly one of these labels. Reply with the label only.\n"
    "Labels:\n{labels}\n\nText: {text}"
)


def marker_pattern(config: ClassifyConfig, languages: list[str]) -> re.Pattern[str] | None:
    """One pattern for the markers of `languages`: words of letters whole, others anywhere."""
    parts = []
    for language in languages:
        for marker in config.contrast_markers.get(language, []):
            escaped = re.escape(marker)
            parts.append(rf"\b{escaped}\b" if marker.isascii() and marker.isalpha() else escaped)
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def calibrated(similarities: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of cosine similarities -> probabilities: softmax(similarity / temperature)."""
    z = similarities / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True).clip(min=1e-12)


def label_vectors(descriptions: list[np.ndarray], examples: list[np.ndarray | None]) -> np.ndarray:
    """One unit vector per label: the mean of its descriptions' vectors, averaged with the mean
    of its examples' vectors when it has examples (each side weighs half, so a few examples
    neither vanish beside many descriptions nor drown them)."""
    out = []
    for described, shown in zip(descriptions, examples, strict=True):
        vector = _unit(described.mean(axis=0))
        if shown is not None and len(shown):
            vector = vector + _unit(shown.mean(axis=0))
        out.append(_unit(vector))
    return np.stack(out)


def split_vectors(request: ClassifyRequest, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The embedded `inputs + descriptions + examples` -> (input vectors, label vectors)."""
    texts, rest = np.split(vectors, [len(request.inputs)])
    described, shown = [], []
    for ds in request.label_descriptions:
        described.append(rest[: len(ds)])
        rest = rest[len(ds) :]
    for name in request.names:
        count = len((request.examples or {}).get(name, []))
        shown.append(rest[:count] if count else None)
        rest = rest[count:]
    return texts, label_vectors(described, shown)


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.05})
class Classify:
    def __init__(
        self, embedder: DeploymentHandle, generator: DeploymentHandle, config: AppConfig
    ) -> None:
        self.embedder = embedder
        self.generator = generator
        self.config = config.classify
        self.decision = decision(config)
        self.markers = marker_pattern(self.config, self.decision.marker_languages)

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        start = time.perf_counter()
        names = request.names
        embedded = await self.embedder.embed.remote(
            list(request.inputs) + request.descriptions + request.example_texts
        )
        texts, labels = split_vectors(request, embedded.vectors)
        probabilities = calibrated(texts @ labels.T, self.decision.temperature)
        threshold = self.decision.threshold if request.threshold is None else request.threshold
        reasons = [
            self._reason(request.escalate, text, p.max(), threshold)
            for text, p in zip(request.inputs, probabilities, strict=True)
        ]
        wanted = [i for i, reason in enumerate(reasons) if reason]
        # The least confident first: when the cap binds, they are the ones most likely wrong.
        wanted.sort(key=lambda i: probabilities[i].max())
        asked = wanted[: self.config.max_escalated]
        skipped: dict[int, str] = {i: "max_escalated" for i in wanted[len(asked) :]}
        choices = await asyncio.gather(*(self._ask(request, request.inputs[i]) for i in asked))
        llm: dict[int, tuple[int, float]] = {}
        for i, choice in zip(asked, choices, strict=True):
            if choice.probabilities is None:
                skipped[i] = choice.skipped
            else:
                best = int(np.argmax(choice.probabilities))
                llm[i] = (best, float(choice.probabilities[best]))
        results = []
        for i, p in enumerate(probabilities):
            fast = int(p.argmax())
            label, probability = llm.get(i, (fast, float(p[fast])))
            results.append(
                ClassifyResult(
                    index=i,
                    label=names[label],
                    probability=probability,
                    decided_by="llm" if i in llm else "embedding",
                    escalated=reasons[i],
                    skipped=skipped.get(i),
                    embedding_label=names[fast],
                    embedding_probability=float(p[fast]),
                )
            )
        metrics = classify_metrics()
        for decided_by, n in (("embedding", len(results) - len(llm)), ("llm", len(llm))):
            if n:
                metrics.inputs.inc(n, tags={"decided_by": decided_by})
        path = "llm" if llm else "embedding"
        metrics.latency.observe((time.perf_counter() - start) * 1000, tags={"path": path})
        return ClassifyResponse(
            data=results, model=embedded.model, escalated=len(llm), skipped=len(skipped)
        )

    def _reason(self, mode: str, text: str, top: float, threshold: float) -> str | None:
        if mode == "always":
            return "always"
        if mode == "never":
            return None
        if top < threshold:
            return "low_confidence"
        if self.markers is not None and self.markers.search(text):
            return "contrast_marker"
        return None

    async def _ask(self, request: ClassifyRequest, text: str) -> Choice:
        return await self.generator.choose.remote(
            prompt_messages(request, text), request.names, self.config.max_prompt_tokens
        )


def prompt_messages(request: ClassifyRequest, text: str) -> list[dict[str, str]]:
    """The generator's prompt: the labels with their first description, then the text."""
    described = [
        n if n == ds[0] else f"{n}: {ds[0]}"
        for n, ds in zip(request.names, request.label_descriptions, strict=True)
    ]
    prompt = INSTRUCTION.format(labels="\n".join(f"- {d}" for d in described), text=text)
    return [{"role": "user", "content": prompt}]
