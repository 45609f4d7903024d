"""RAG answers on a labelled set: do they cite the right source, stay on their sources, and
never loop? In process, without Ray: the store retrieves as the RAG route does (an embedded
PostgreSQL, the configured search mode), the Generator's own decode loop answers, once with
each prompt setting.

Each manual page's opening is a source; its one-line description, asked as a question, is the
query whose right source is that page. For every setting the report gives:
- `cites_right`: among answers whose sources hold the right page, the share citing its number;
- `cites_only_right`: among the same, the share citing its number and no other source's (an
  answer citing every source it was given cites the right one too, but says nothing);
- `degenerate`: the share that repeat a sentence or a 6-word run, or emit a bare run of three
  or more citation markers (with three sources, "[1] [2] [3]");
- `grounded`: the share whose words (4+ letters) come mostly (over half) from their sources.

    .venv/bin/python scripts/bench_rag_answers.py [--config serve_config.yaml] \
        [--out docs/benchmarks]  # 48 questions
    .venv/bin/python scripts/bench_rag_answers.py --smoke  # 4 questions, report in a temp folder
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from benchkit import models
from benchkit.corpus import man_corpus
from benchkit.report import ROOT, add_output_options, machine, output_dir, write_report

from serve_app.config import AppConfig, RagConfig
from serve_app.contracts import DocumentChunks, GenerationRequest
from serve_app.launch import load_config
from serve_app.pipelines.citations import filter_citations
from serve_app.pipelines.rag import prompt
from serve_app.protocol.documents import Citation, RagRequest
from serve_app.store import open_store
from serve_app.store.embedded import stop_embedded

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
    markers = re.search(r"(\[\d+\][\s,;.\-]*){3,}", text) is not None
    return len(sentences) != len(set(sentences)) or len(runs) != len(set(runs)) or markers


def grounded(text: str, sources: str) -> bool:
    words = re.findall(r"[a-z][a-z0-9_]{3,}", text.lower())
    known = set(re.findall(r"[a-z][a-z0-9_]{3,}", sources.lower()))
    return bool(words) and sum(w in known for w in words) / len(words) > 0.5


async def retrieved(config: AppConfig, docs: list[dict], vectors, questions, query_vectors, top):
    """Each question's `top` pages as the RAG route retrieves them: the store (an embedded
    server in a temporary folder), the configured mode, fusion and text-search configuration,
    one chunk a page."""
    folder = Path(tempfile.mkdtemp(prefix="bench-rag-answers-"))
    store_config = config.store.model_copy(update={"database_url": None, "data_dir": folder})
    store = await open_store(store_config)
    try:
        collection = await store.ensure_collection(
            "pages", config.embedder.model, vectors.shape[1], config.retrieval.text_search_config
        )
        await store.replace_documents(
            collection,
            [
                DocumentChunks(d["id"], {}, [d["text"]], v[None])
                for d, v in zip(docs, vectors, strict=True)
            ],
        )
        found = []
        for question, q in zip(questions, query_vectors, strict=True):
            found.append(await search(store, collection, config, question, q, top))
        return found
    finally:
        await store.close()
        stop_embedded(folder)
        shutil.rmtree(folder, ignore_errors=True)


async def search(store, collection, config: AppConfig, question: str, vector, top: int):
    mode, ef_search = config.retrieval.mode, config.store.ef_search
    if mode == "dense":
        return await store.search(collection, vector, top, ef_search=ef_search)
    if mode == "keyword":
        return await store.keyword_search(collection, question, top)
    fusion = config.retrieval
    return await store.hybrid_search(
        collection, vector, question, top, None, ef_search, fusion.rrf_k, fusion.candidates
    )


def cases(n: int, passages: int, top: int, embedder, config: AppConfig) -> list[Case]:
    docs = man_corpus(max(passages, n), 600)
    labelled = [d for d in docs if d["labelled"]]
    rng = np.random.default_rng(0)
    asked = [labelled[i] for i in rng.choice(len(labelled), n, replace=False)]
    questions = [f"Which command would I use to {d['query'].rstrip('.')}?" for d in asked]
    vectors = embedder.encode([d["text"] for d in docs], normalize_embeddings=True, batch_size=32)
    query_vectors = embedder.encode(questions, normalize_embeddings=True)
    hits = asyncio.run(retrieved(config, docs, vectors, questions, query_vectors, top))
    return [
        Case(
            question,
            doc["id"],
            [
                Citation(
                    number=k,
                    document_id=h.document_id,
                    chunk_id=h.chunk_id,
                    score=h.score,
                    text=h.text,
                )
                for k, h in enumerate(found, start=1)
            ],
        )
        for question, doc, found in zip(questions, asked, hits, strict=True)
    ]


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


def cited(answer: str, citations: list[Citation]) -> set[int]:
    """The given sources' numbers that `answer` cites."""
    given = {c.number for c in citations}
    return {int(n) for n in re.findall(r"\[(\d+)\]", answer)} & given


def scored(setting: RagConfig, all_cases: list[Case], answers: list[str], seconds: float) -> dict:
    pairs = list(zip(all_cases, answers, strict=True))
    # Among answers whose sources hold the right page: the numbers cited, and the right one's.
    found = [
        (cited(a, c.citations), next(x.number for x in c.citations if x.document_id == c.right))
        for c, a in pairs
        if any(x.document_id == c.right for x in c.citations)
    ]
    return {
        "no_repeat_ngram": setting.no_repeat_ngram,
        "questions": len(all_cases),
        "right_source_retrieved": len(found),
        "cites_right": statistics.mean(r in n for n, r in found) if found else None,
        "cites_only_right": statistics.mean(n == {r} for n, r in found) if found else None,
        "degenerate": statistics.mean(degenerate(a) for a in answers),
        "grounded": statistics.mean(
            grounded(a, " ".join(x.text for x in c.citations)) for c, a in pairs
        ),
        "seconds": seconds,
        "answers": [
            {
                "question": c.question,
                "right": c.right,
                "sources": [x.document_id for x in c.citations],
                "answer": a,
            }
            for c, a in pairs
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
        "| setting | cites the right source (when retrieved) | cites it alone | degenerate "
        "| grounded | s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["settings"].items():
        cites, alone = (
            "-" if r[key] is None else f"{r[key]:.2f}"
            for key in ("cites_right", "cites_only_right")
        )
        rows.append(
            f"| {name} (no_repeat_ngram {r['no_repeat_ngram']}) | {cites} "
            f"({r['right_source_retrieved']} of {r['questions']}) | {alone} | "
            f"{r['degenerate']:.2f} | {r['grounded']:.2f} | {r['seconds']:.0f} |"
        )
    m = report["machine"]
    return "\n".join(
        [
            "# RAG answers on a labelled set",
            "",
            f"{report['model']} on {report.get('engine', '-')}, greedy, "
            f"{report['max_tokens']} new tokens at most, "
            f"{report['top']} sources a question, found by {report.get('retrieval', 'dense')} "
            f"search among {report.get('passages', '-')} manual pages; {m['cpu']}, "
            f"{m['threads']} threads, "
            f"{m['date']}.",
            "",
            *rows,
            "",
            "`before`: the earlier prompt (sources, then the question) and plain greedy "
            "decoding. `now`: the configured `rag` settings (question, sources, the question "
            "again; the answer never repeats its own n-grams), first with the citation markers "
            "as the model wrote them, then as the RAG route serves them: markers that name no "
            "given source dropped, and an answer citing none given the source holding at least "
            "half its words (`rag.grounding_citation`, serve_app/pipelines/citations.py). "
            "`cites it alone`: the right source and no other (citing every source given cites "
            "the right one too). `degenerate`: a sentence or a 6-word run repeated, or three or "
            "more citation markers in a row.",
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
    all_cases = cases(options.questions, options.passages, options.top, embedder, config)
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
        "retrieval": config.retrieval.mode,
        "passages": options.passages,
        "machine": machine("cpu", torch.get_num_threads()),
        "settings": measure(generator, config, all_cases, options),
    }
    write_report(report, "rag_answers", markdown, output_dir(options))


if __name__ == "__main__":
    main()
