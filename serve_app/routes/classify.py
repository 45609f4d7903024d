"""The classify route's deployment: a confidence cascade.

Every input is scored against the label descriptions by embedding similarity (a softmax over
cosines at a calibrated temperature). Under `escalate: auto`, an input whose top probability is
under the threshold, or that holds a contrast marker ("good, but ..."), goes to the generator,
which must answer with one of the labels (`Generator.choose` scores each label as the reply).
"""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig, ClassifyConfig
from serve_app.metrics import classify_metrics
from serve_app.protocol.classify import ClassifyRequest, ClassifyResponse, ClassifyResult

INSTRUCTION = (
    "Classify the text into exactly one of these labels. Reply with the label only.\n"
    "Labels:\n{labels}\n\nText: {text}"
)


def marker_pattern(config: ClassifyConfig) -> re.Pattern[str] | None:
    """One pattern for every language's markers: words of letters whole, others anywhere."""
    parts = []
    for markers in config.contrast_markers.values():
        for marker in markers:
            escaped = re.escape(marker)
            parts.append(rf"\b{escaped}\b" if marker.isascii() and marker.isalpha() else escaped)
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def calibrated(similarities: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of cosine similarities -> probabilities: softmax(similarity / temperature)."""
    z = similarities / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.05})
class Classify:
    def __init__(
        self, embedder: DeploymentHandle, generator: DeploymentHandle, config: AppConfig
    ) -> None:
        self.embedder = embedder
        self.generator = generator
        self.config = config.classify
        self.markers = marker_pattern(self.config)

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        start = time.perf_counter()
        names, descriptions = request.names, request.descriptions
        embedded = await self.embedder.embed.remote(list(request.inputs) + descriptions)
        texts, labels = np.split(embedded.vectors, [len(request.inputs)])
        probabilities = calibrated(texts @ labels.T, self.config.temperature)
        threshold = self.config.threshold if request.threshold is None else request.threshold
        reasons = [
            self._reason(request.escalate, text, p.max(), threshold)
            for text, p in zip(request.inputs, probabilities, strict=True)
        ]
        escalated = [i for i, reason in enumerate(reasons) if reason]
        choices = await asyncio.gather(
            *(self._ask(request.inputs[i], names, descriptions) for i in escalated)
        )
        llm = dict(zip(escalated, choices, strict=True))
        results = []
        for i, p in enumerate(probabilities):
            fast = int(p.argmax())
            label, probability = (fast, float(p[fast]))
            if i in llm:
                label, probability = llm[i]
            results.append(
                ClassifyResult(
                    index=i,
                    label=names[label],
                    probability=probability,
                    decided_by="llm" if i in llm else "embedding",
                    escalated=reasons[i],
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
        return ClassifyResponse(data=results, model=embedded.model, escalated=len(llm))

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

    async def _ask(self, text: str, names: list[str], descriptions: list[str]) -> tuple[int, float]:
        described = [n if n == d else f"{n}: {d}" for n, d in zip(names, descriptions, strict=True)]
        prompt = INSTRUCTION.format(labels="\n".join(f"- {d}" for d in described), text=text)
        probabilities = await self.generator.choose.remote(
            [{"role": "user", "content": prompt}], names
        )
        best = int(np.argmax(probabilities))
        return best, float(probabilities[best])
