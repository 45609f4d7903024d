"""RAG answers on a labelled set: do they cite the right source, stay on their sources, and
never loop? In process, without Ray: the Embedder's model retrieves, the Generator's own decode
loop answers, once with each prompt setting.

Each manual page's opening is a source; its one-line description, asked as a question, is the
query whose right source is that page. For every setting the report gives:
- `cites_right`: among answers whose sources hold the right page, the share citing its number;
- `degenerate`: the share that repeat a sentence or a 6-word run, or emit a bare run of
  citation markers;
- `grounded`: the share whose words (4+ letters) come mostly (over half) from their sources.

    .venv/bin/python scripts/bench_rag_answers.py [--config serve_config.yaml] \
        [--out docs/benchmarks]  # 48 questions
    .venv/bin/python scripts/bench_rag_answers.py --smoke  # 4 questions, report in a temp folder
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import dataclass

import numpy as np
from benchkit import models
from benchkit.corpus import man_corpus
from benchkit.report import ROOT, add_output_options, machine, output_dir, write_report

from serve_app.config import AppConfig, RagConfig
from serve_app.contracts import GenerationRequest
from serve_app.launch import load_config
from serve_app.pipelines.citations import filter_citations
from serve_app.pipelines.rag import prompt
from serve_app.protocol.documents import Citation, RagRequest

# The prompt and decoding RAG used before answers were kept from repeating themselves.
BEFORE = RagConfig(
    system_prompt=(
        "Answer the question using only the numbered sources. Cite the sources you use by "
        "their number in square brackets, like [1]. If the sources do not answer the "
        "question, say so."
    ),
    no_repeat_ngram=0,
)


def before_prompt(system: str, query: str, citations: list[Citation]) -> list[dict[str, str]]:
    sources = "\n\n".join(f"[{c.number}] {c.text}" for c in citations)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {query}"},
    ]


@dataclass
class Case:
    question: str
    right: str  # the page that answers it
    citations: list[Citation]


def degenerate(text: str) -> bool:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n", text) if len(s.strip()) > 10]
    words = text.split()
    runs = [tuple(words[i : i + 6]) for i in range(len(words) - 5)]
    markers = re.search(r"(\[\d+\][\s,;.\-]*){4,}", text) is not None
    return len(sentences) != len(set(sentences)) or len(runs) != len(set(runs)) or markers


def grounded(text: str, sources: str) -> bool:
    words = re.findall(r"[a-z][a-z0-9_]{3,}", text.lower())
    known = set(re.findall(r"[a-z][a-z0-9_]{3,}", sources.lower()))
    return bool(words) and sum(w in known for w in words) / len(words) > 0.5


def cases(n: int, passages: int, top: int, embedder) -> list[Case]:
    docs = man_corpus(max(passages, n), 600)
    labelled = [d for d in docs if d["labelled"]]
    rng = np.random.default_rng(0)
    asked = [labelled[i] for i in rng.choice(len(labelled), n, replace=False)]
    texts = [d["text"] for d in docs]
    vectors = embedder.encode(texts, normalize_embeddings=True, batch_size=32)
    out = []
    for doc in asked:
        question = f"Which command would I use to {doc['query'].rstrip('.')}?"
        q = embedder.encode([question], normalize_embeddings=True)[0]
        best = np.argsort(vectors @ q)[::-1][:top]
        citations = [
            Citation(number=k + 1, document_id=docs[i]["id"], chunk_id=0, score=0.0, text=texts[i])
            for k, i in enumerate(best)
        ]
        out.append(Case(question, doc["id"], citations))
    return out


def answer_all(engine, requests: list[GenerationRequest], batch: int) -> list[str]:
    """The Generator's engine decoding, minus Serve, `batch` requests at a time."""
    answers = []
    for start in range(0, len(requests), batch):
        answers += models.decode(engine, requests[start : start + batch])[1]
    return answers


def answers_to(generator, setting: RagConfig, build, all_cases: list[Case], options):
    requests = [
        GenerationRequest(
            messages=build(setting.system_prompt, c.question, c.citations),
            max_tokens=options.max_tokens,
            no_repeat_ngram=setting.no_repeat_ngram,
        )
        for c in all_cases
    ]
    start = time.perf_counter()
    answers = answer_all(generator, requests, options.batch)
    return answers, time.perf_counter() - start


def scored(setting: RagConfig, all_cases: list[Case], answers: list[str], seconds: float) -> dict:
    found = [
        (c, a)
        for c, a in zip(all_cases, answers, strict=True)
        if any(x.document_id == c.right for x in c.citations)
    ]
    right = sum(
        f"[{next(x.number for x in c.citations if x.document_id == c.right)}]" in a
        for c, a in found
    )
    return {
        "no_repeat_ngram": setting.no_repeat_ngram,
        "questions": len(all_cases),
        "right_source_retrieved": len(found),
        "cites_right": right / len(found) if found else None,
        "degenerate": statistics.mean(degenerate(a) for a in answers),
        "grounded": statistics.mean(
            grounded(a, " ".join(x.text for x in c.citations))
            for c, a in zip(all_cases, answers, strict=True)
        ),
        "seconds": seconds,
        "examples": [
            {"question": c.question, "answer": a}
            for c, a in zip(all_cases[:3], answers[:3], strict=True)
        ],
    }


def measure(generator, config: AppConfig, all_cases: list[Case], options) -> dict[str, dict]:
    """Each setting's answers; the configured one twice: as the model wrote its markers, and
    as the RAG route serves them (through its citation filter)."""
    before, seconds = answers_to(generator, BEFORE, before_prompt, all_cases, options)
    now, now_seconds = answers_to(generator, config.rag, prompt, all_cases, options)
    served = [
        filter_citations(a, c.citations, config.rag.grounding_citation)
        for c, a in zip(all_cases, now, strict=True)
    ]
    return {
        "before": scored(BEFORE, all_cases, before, seconds),
        "now, model's markers": scored(config.rag, all_cases, now, now_seconds),
        "now, served": scored(config.rag, all_cases, served, now_seconds),
    }


def markdown(report: dict) -> str:
    rows = [
        "| setting | cites the right source (when retrieved) | degenerate | grounded | s |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["settings"].items():
        cites = "-" if r["cites_right"] is None else f"{r['cites_right']:.2f}"
        rows.append(
            f"| {name} (no_repeat_ngram {r['no_repeat_ngram']}) | {cites} "
            f"({r['right_source_retrieved']} of {r['questions']}) | {r['degenerate']:.2f} | "
            f"{r['grounded']:.2f} | {r['seconds']:.0f} |"
        )
    m = report["machine"]
    return "\n".join(
        [
            "# RAG answers on a labelled set",
            "",
            f"{report['model']} on {report.get('engine', '-')}, greedy, "
            f"{report['max_tokens']} new tokens at most, "
            f"{report['top']} sources a question; {m['cpu']}, {m['threads']} threads, "
            f"{m['date']}.",
            "",
            *rows,
            "",
            "`before`: the earlier prompt (sources, then the question) and plain greedy "
            "decoding. `now`: the configured `rag` settings (question, sources, the question "
            "again; the answer never repeats its own n-grams), first with the citation markers "
            "as the model wrote them, then as the RAG route serves them: markers that name no "
            "given source dropped, and an answer citing none given the source holding at least "
            "half its words (`rag.grounding_citation`, serve_app/pipelines/citations.py).",
            "",
            "Made by `.venv/bin/python scripts/bench_rag_answers.py`.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="serve_config.yaml", help="the app's settings (models, threads, rag)"
    )
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--passages", type=int, default=400, help="manual pages searched")
    served = RagRequest.model_fields["rerank_top_n"].default  # the sources RAG reads
    parser.add_argument(
        "--top", type=int, default=served, help=f"sources per question (served: {served})"
    )
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    add_output_options(parser, "4 questions over 40 pages, 16 tokens each")
    options = parser.parse_args()
    if options.smoke:
        options.questions, options.passages, options.max_tokens = 4, 40, 16

    import torch
    from sentence_transformers import SentenceTransformer

    from deployments.engines.loading import local_path

    # The served settings: the Generator's threads decide the engine `auto` picks.
    config = AppConfig(**load_config(ROOT / options.config)["applications"][0]["args"])
    embedder = SentenceTransformer(local_path(config.embedder.model), device="cpu")
    all_cases = cases(options.questions, options.passages, options.top, embedder)
    del embedder
    # The engine of the Generator RAG answers on (its own, unless `rag.generator: shared`).
    answers = "rag" if config.rag.generator == "own" else "all"
    generator = models.generation_engine(config.generator, config.model_cache_dir, answers)
    report = {
        "model": config.generator.name,
        # The engine `auto` picked here: answers differ between engines and weights.
        "engine": f"{generator.info()['engine']} ({generator.info().get('precision', '-')})",
        "max_tokens": options.max_tokens,
        "top": options.top,
        "machine": machine("cpu", torch.get_num_threads()),
        "settings": measure(generator, config, all_cases, options),
    }
    write_report(report, "rag_answers", markdown, output_dir(options))


if __name__ == "__main__":
    main()
