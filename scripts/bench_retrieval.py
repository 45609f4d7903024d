"""Retrieval benchmark: ingestion, search latency and recall per mode, with and without rerank.

    .venv/bin/python scripts/bench_retrieval.py [--docs 5000] [--packages 1000] [--queries 100]
        [--rerank-queries 40] [--scale 100000] [--modes dense,keyword,hybrid] [--no-rerank]
        [--out docs/benchmarks] [--smoke]

Two labelled sets of real text from this machine, each query with one right document:
- man pages (/usr/share/man): a page's NAME line ("ls - list directory contents") is the query,
  the rest of the page its document, so the query text never appears verbatim in what is
  searched (a page installed under several names counts once, and a NAME line that several
  pages share asks for none of them);
- Debian packages (the installed packages' descriptions in /var/lib/dpkg/status): a package's
  one-line synopsis is the query, its long description the document.

In one run it measures:
1. ingest throughput end to end over HTTP (docs/s, chunks/s) per set, against raw in-process
   embedding of the same chunks with the replica's own code, precision and threads;
2. search latency p50/p99 at top_k=10, exact vs HNSW over several ef_search, and HNSW recall@10
   against exact search, on the man pages and on `--scale` sentence chunks;
3. retrieval quality per set, search mode (dense, keyword, hybrid) and text-search configuration
   (`simple` and `english`): recall@1, recall@10 and MRR@10 over HTTP; then, on the first
   `--rerank-queries` queries, the same with the reranker reordering the top 10, against the
   same queries without it (what rerank adds, and what it costs per query);
4. per mode, search latency p50/p99 in process (the query's vector given), on each set and on
   the `--scale` chunks (`--scale 0` skips them);
5. per set, hybrid recall over a grid of the fusion constant k and the candidates per side, in
   process: where the service's defaults come from.
Writes OUT/retrieval.json and retrieval.md.

--smoke: 40 pages, 40 packages, 5 queries each, 500 scale chunks with random vectors, dense
search, no reranker.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import random
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from benchkit import models
from benchkit.cluster import in_process, with_args
from benchkit.corpus import man_corpus, package_corpus
from benchkit.report import (
    ROOT,
    add_output_options,
    command_line,
    output_dir,
    percentiles_ms,
    write_report,
)

from serve_app.config import AppConfig, StoreConfig
from serve_app.contracts import DocumentChunks
from serve_app.launch import load_config
from serve_app.store import open_store
from serve_app.store.embedded import stop_embedded

EF_SEARCH = (20, 40, 80, 160)
TOP_K = 10


# --- measurements -------------------------------------------------------------------------
def ingest_http(base_url: str, collection: str, docs: list[dict], in_flight: int = 4) -> dict:
    """Ingest `docs` through POST /v1/documents, `in_flight` requests at a time."""
    batches = [docs[i : i + 16] for i in range(0, len(docs), 16)]

    def post(batch: list[dict]) -> int:
        body = {
            "collection": collection,
            "documents": [{k: d[k] for k in ("id", "text", "metadata")} for d in batch],
            "text_search_config": "simple",  # named: the service's default may differ
        }
        response = httpx.post(f"{base_url}/v1/documents", json=body, timeout=900)
        response.raise_for_status()
        return response.json()["chunks"]

    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        chunks = sum(pool.map(post, batches))
    elapsed = time.perf_counter() - start
    return {
        "documents": len(docs),
        "chunks": chunks,
        "seconds": elapsed,
        "docs_per_s": len(docs) / elapsed,
        "chunks_per_s": chunks / elapsed,
    }


def raw_embedding(args: dict, texts: list[str]) -> float:
    """Chunks/s of the Embedder's model in this process (replica precision and threads), in
    requests of the deployment's max_batch_size."""
    config = AppConfig(**args)
    model = models.embedding_model(config.embedder, config.model_cache_dir)
    size = config.embedder.batching.max_batch_size
    start = time.perf_counter()
    for i in range(0, len(texts), size):
        model.encode(texts[i : i + size])
    return len(texts) / (time.perf_counter() - start)


def rank_metrics(ranked: list[list[str]], relevant: list[str]) -> dict:
    """Document-level recall@1, recall@10 and MRR@10 (a document's chunks count once, at the
    place of its best)."""
    r1 = r10 = mrr = 0.0
    for docs, target in zip(ranked, relevant, strict=True):
        unique = list(dict.fromkeys(docs))[:10]
        if unique[:1] == [target]:
            r1 += 1
        if target in unique:
            r10 += 1
            mrr += 1 / (unique.index(target) + 1)
    n = len(relevant)
    return {"recall@1": r1 / n, "recall@10": r10 / n, "mrr@10": mrr / n}


def ask(base_url: str, collection: str, queries: list[dict], mode: str, rerank: bool) -> tuple:
    """Each query's ranked document ids from POST /v1/search, and its latency in seconds."""
    ranked, latencies = [], []
    for q in queries:
        body = {
            "collection": collection,
            "query": q["query"],
            "top_k": TOP_K,
            "rerank": rerank,
            "mode": mode,
        }
        start = time.perf_counter()
        response = httpx.post(f"{base_url}/v1/search", json=body, timeout=600)
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()
        ranked.append([r["document_id"] for r in response.json()["results"]])
    return ranked, latencies


def measured(ranked: list[list[str]], latencies: list[float], queries: list[dict]) -> dict:
    metrics = rank_metrics(ranked, [q["id"] for q in queries])
    return {**metrics, "queries": len(queries), "p50_ms": percentiles_ms(latencies)["p50"]}


def quality(
    base_url: str,
    collections: dict[str, str],
    queries: list[dict],
    modes: list[str],
    rerank_queries: int,
) -> tuple[dict, dict]:
    """Document-level recall@1/@10 and MRR@10 of /v1/search per mode and text-search
    configuration (`collections`: configuration -> collection) on every query; and on the first
    `rerank_queries` (0: none), each pipeline without and with the reranker reordering its top
    10. Dense results do not depend on the configuration: measured once."""
    plain, reranked = {}, {}
    subset = queries[:rerank_queries]
    for config, collection in collections.items():
        for mode in modes:
            if mode == "dense" and config != "simple":
                continue
            name = mode if mode == "dense" else f"{mode} ({config})"
            ranked, latencies = ask(base_url, collection, queries, mode, rerank=False)
            plain[name] = measured(ranked, latencies, queries)
            if subset:
                with_rerank = ask(base_url, collection, subset, mode, rerank=True)
                n = len(subset)
                reranked[name] = {
                    "without": measured(ranked[:n], latencies[:n], subset),
                    "with": measured(*with_rerank, subset),
                }
            print(f"quality {collection} {name}: {plain[name]}", flush=True)
    return plain, reranked


async def copy_collection(
    store_config: StoreConfig, source: str, target: str, text_search_config: str
) -> None:
    """`source`'s documents and vectors again as `target`, keyword-indexed with
    `text_search_config`: another configuration without embedding everything again."""
    store = await open_store(store_config)
    try:
        old = await store.collection(source)
        new = await store.ensure_collection(
            target, old.embedding_model, old.dimensions, text_search_config
        )
        async with store.connection(transaction=True) as conn:
            await conn.execute(
                "INSERT INTO documents (collection_id, id, metadata)"
                " SELECT %s, id, metadata FROM documents WHERE collection_id = %s",
                (new.id, old.id),
            )
            await conn.execute(
                "INSERT INTO chunks (collection_id, document_id, ordinal, text, metadata,"
                " embedding, text_search_config) SELECT %s, document_id, ordinal, text,"
                " metadata, embedding, %s::regconfig FROM chunks WHERE collection_id = %s",
                (new.id, text_search_config, old.id),
            )
    finally:
        await store.close()


async def mode_latency(
    store_config: StoreConfig, collection_name: str, queries: list[str], vectors: np.ndarray
) -> list[dict]:
    """p50/p99 of top-10 search per mode, in process, the query's vector given."""
    store = await open_store(store_config)
    rows = []
    try:
        collection = await store.collection(collection_name)
        searches = {
            "dense (hnsw ef_search=80)": lambda q, v: store.search(collection, v, 10),
            "keyword": lambda q, v: store.keyword_search(collection, q, 10),
            "hybrid": lambda q, v: store.hybrid_search(collection, v, q, 10),
        }
        for name, search in searches.items():
            times = []
            for q, v in zip(queries, vectors, strict=True):
                start = time.perf_counter()
                await search(q, v)
                times.append(time.perf_counter() - start)
            row = summary(name, times, float("nan"))
            del row["recall@10"]
            rows.append(row)
    finally:
        await store.close()
    return rows


FUSION_K = (1, 5, 20, 60)
FUSION_CANDIDATES = (20, 40, 100)


async def fusion_sweep(
    store_config: StoreConfig, collections: dict[str, str], queries: list[dict], vectors
) -> list[dict]:
    """Hybrid recall@1/@10 and MRR@10 in process for each reciprocal-rank constant k and
    candidates per side (FUSION_K x FUSION_CANDIDATES), per text-search configuration
    (`collections`: configuration -> collection): the grid the service's defaults come from."""
    store = await open_store(store_config)
    rows = []
    try:
        found = {config: await store.collection(name) for config, name in collections.items()}
        for k in FUSION_K:
            for candidates in FUSION_CANDIDATES:
                row: dict = {"k": k, "candidates": candidates}
                for config, collection in found.items():
                    ranked = []
                    for q, v in zip(queries, vectors, strict=True):
                        hits = await store.hybrid_search(
                            collection,
                            v,
                            q["query"],
                            TOP_K,
                            ef_search=store_config.ef_search,
                            rrf_k=k,
                            candidates=candidates,
                        )
                        ranked.append([h.document_id for h in hits])
                    row[config] = rank_metrics(ranked, [q["id"] for q in queries])
                rows.append(row)
    finally:
        await store.close()
    return rows


async def latency_and_recall(
    store_config: StoreConfig, collection_name: str, queries: np.ndarray
) -> list[dict]:
    """p50/p99 of top-10 search, exact and HNSW per ef_search, and recall@10 against exact."""
    store = await open_store(store_config)
    rows = []
    try:
        collection = await store.collection(collection_name)
        # Recall counts a hit as found when it is as near as the exact 10th: duplicate chunks
        # (man pages repeat across aliases) tie, and any of the tied copies is a right answer.
        exact_cutoff, times = [], []
        for q in queries:
            start = time.perf_counter()
            hits = await store.search(collection, q, 10, exact=True)
            times.append(time.perf_counter() - start)
            exact_cutoff.append(hits[-1].score - 1e-6)
        rows.append(summary("exact", times, 1.0))
        for ef in EF_SEARCH:
            found, times = 0, []
            for q, cutoff in zip(queries, exact_cutoff, strict=True):
                start = time.perf_counter()
                hits = await store.search(collection, q, 10, ef_search=ef)
                times.append(time.perf_counter() - start)
                found += sum(h.score >= cutoff for h in hits)
            rows.append(summary(f"hnsw ef_search={ef}", times, found / (10 * len(queries))))
    finally:
        await store.close()
    return rows


def summary(name: str, times: list[float], recall: float) -> dict:
    latency = percentiles_ms(times)
    return {"search": name, "p50_ms": latency["p50"], "p99_ms": latency["p99"], "recall@10": recall}


async def load_scale(
    store_config: StoreConfig, model: str, sentences: list[str], vectors: np.ndarray
) -> None:
    """Put `--scale` sentence chunks straight into a collection (binary COPY, no HTTP)."""
    store = await open_store(store_config)
    try:
        collection = await store.ensure_collection("scale", model, vectors.shape[1])
        step = 10_000
        for i in range(0, len(sentences), step):
            doc = DocumentChunks(
                f"part-{i // step}", {}, sentences[i : i + step], vectors[i : i + step]
            )
            await store.replace_documents(collection, [doc])
    finally:
        await store.close()


def scale_vectors(args: dict, sentences: list[str]) -> np.ndarray:
    config = AppConfig(**{**args, "embedder": {**args.get("embedder", {}), "threads": 2}})
    model = models.embedding_model(config.embedder, config.model_cache_dir)
    parts = [model.encode(sentences[i : i + 256]) for i in range(0, len(sentences), 256)]
    return np.concatenate(parts)


def sentences_of(docs: list[dict], limit: int) -> list[str]:
    out = []
    for d in docs:
        for s in re.split(r"(?<=[.!?])\s+", d["full"]):
            if 4 <= len(s.split()) <= 60:
                out.append(s)
    out = list(dict.fromkeys(out))
    while len(out) < limit:  # reuse sentences with a marker if the corpus is short
        out += [f"{s} ({len(out)})" for s in out[: limit - len(out)]]
    return out[:limit]


# --- report -------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [
        "# Retrieval benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; {report['date']}.",
        "One run on a shared, noisy machine: compare ratios within this report.",
        "",
        "Labelled sets (each query has one right document):",
        "",
    ]
    lines += [f"- **{name}**: {s['corpus']}." for name, s in report["sets"].items()]
    lines += [
        "",
        "## Retrieval quality (document level)",
        "",
        f"Over HTTP (`POST /v1/search`, top_k={TOP_K}); `(simple)` and `(english)` name the",
        "collection's text-search configuration. p50 includes embedding the query. Hybrid:",
        f"{report['fusion']}.",
        "",
    ]
    for name, s in report["sets"].items():
        lines += [
            f"**{name}** ({s['queries']} queries)",
            "",
            "| pipeline | recall@1 | recall@10 | MRR@10 | p50 ms |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {pipeline} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} | "
            f"{m['p50_ms']:.0f} |"
            for pipeline, m in s["quality"].items()
        ]
        lines.append("")
    if any(s["rerank"] for s in report["sets"].values()):
        lines += [
            "## Rerank: what it adds, what it costs",
            "",
            f"The reranker ({report['reranker']}) reorders each pipeline's top {TOP_K}, as RAG's",
            "rerank does before keeping its sources. Without and with it on the same queries (the",
            "first of each set's); p50 is the whole request's.",
            "",
        ]
        for name, s in report["sets"].items():
            if not s["rerank"]:
                continue
            queries = next(iter(s["rerank"].values()))["with"]["queries"]
            lines += [
                f"**{name}** ({queries} queries)",
                "",
                "| pipeline | rerank | recall@1 | recall@10 | MRR@10 | p50 ms |",
                "|---|---|---|---|---|---|",
            ]
            for pipeline, both in s["rerank"].items():
                for label in ("without", "with"):
                    m = both[label]
                    lines.append(
                        f"| {pipeline} | {label} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | "
                        f"{m['mrr@10']:.3f} | {m['p50_ms']:.0f} |"
                    )
            lines.append("")
    if any(s.get("fusion") for s in report["sets"].values()):
        lines += [
            "## Hybrid fusion: the constant k and the candidates per side",
            "",
            "In process (the query's vector given), the hybrid ranking for each reciprocal rank",
            "constant k and number of candidates taken from each side; recall@1 / recall@10 /",
            "MRR@10 per text-search configuration. The service's defaults are in bold.",
            "",
        ]
        for name, s in report["sets"].items():
            rows = s.get("fusion") or []
            if not rows:
                continue
            configs = [c for c in rows[0] if c not in ("k", "candidates")]
            lines += [
                f"**{name}** ({s['queries']} queries)",
                "",
                "| k | candidates | " + " | ".join(configs) + " |",
                "|---|---|" + "---|" * len(configs),
            ]
            for row in rows:
                cells = [
                    f"{row[c]['recall@1']:.2f} / {row[c]['recall@10']:.2f} / {row[c]['mrr@10']:.3f}"
                    for c in configs
                ]
                default = (row["k"], row["candidates"]) == tuple(report["fusion_defaults"])
                first = (
                    f"**{row['k']}** | **{row['candidates']}**"
                    if default
                    else (f"{row['k']} | {row['candidates']}")
                )
                lines.append(f"| {first} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "## Ingestion (HTTP, end to end)",
        "",
        "| set | documents | chunks | seconds | docs/s | chunks/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["sets"].items():
        i = s["ingest"]
        lines.append(
            f"| {name} | {i['documents']} | {i['chunks']} | {i['seconds']:.1f} | "
            f"{i['docs_per_s']:.1f} | {i['chunks_per_s']:.1f} |"
        )
    lines += [
        "",
        f"Raw in-process embedding of the same chunks: {report['raw_chunks_per_s']:.1f} chunks/s "
        f"(HTTP ingest of the man pages at {report['ingest_ratio']:.2f} of it).",
        "",
        "## Search latency (top_k=10, in process against PostgreSQL) and HNSW recall@10",
        "",
        f"Index: {report['index']}. Recall@10 counts a hit as found when it is as near as the",
        "exact 10th (duplicate chunks tie; any copy is a right answer).",
        "",
    ]
    for name, rows in report["latency"].items():
        lines += [f"**{name}**", ""]
        if "random vectors" in name:  # --random-vectors
            lines += [
                "Random unit vectors: no neighbourhoods for HNSW to follow, so its recall here",
                "says nothing of real text; the latencies stand.",
                "",
            ]
        lines += [
            "| search | p50 ms | p99 ms | recall@10 vs exact |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['search']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall@10']:.3f} |"
            for r in rows
        ]
        lines.append("")
    lines += [
        "## Search latency per mode (top_k=10, in process, the query's vector given)",
        "",
        f"Hybrid: {report['fusion']}.",
        "",
    ]
    for name, rows in report["mode_latency"].items():
        lines += [f"**{name}**", "", "| mode | p50 ms | p99 ms |", "|---|---|---|"]
        lines += [f"| {r['search']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def labelled_sets(options: argparse.Namespace) -> dict[str, dict]:
    """The labelled sets, each with its documents, a fixed sample of its queries, its
    collection's name and a line saying what it is (a set this machine lacks is left out)."""
    man = man_corpus(options.docs, options.max_chars)
    packages = package_corpus(options.packages)
    sets = {
        "man pages": {
            "collection": "man",
            "docs": man,
            "corpus": f"{len(man)} distinct pages of /usr/share/man "
            f"({sum(d['labelled'] for d in man)} outside gcloud with a NAME line of their own "
            f"can be asked for; the others are distractors), first {options.max_chars} "
            "characters of each; query: the NAME line",
        },
        "debian packages": {
            "collection": "packages",
            "docs": packages,
            "corpus": f"{len(packages)} installed packages' long descriptions from "
            "/var/lib/dpkg/status; query: the package's one-line synopsis",
        },
    }
    for labelled_set in sets.values():
        random.seed(0)
        labelled = [d for d in labelled_set["docs"] if d["labelled"]]
        labelled_set["queries"] = random.sample(labelled, min(options.queries, len(labelled)))
    return {name: s for name, s in sets.items() if s["queries"]}


def embed_queries(base_url: str, texts: list[str]) -> np.ndarray:
    data = httpx.post(f"{base_url}/v1/embeddings", json={"input": texts}, timeout=600).json()
    return np.array([d["embedding"] for d in data["data"]], dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--docs", type=int, default=5000, help="man pages")
    parser.add_argument("--packages", type=int, default=1000, help="Debian packages")
    parser.add_argument("--max-chars", type=int, default=2000, help="characters kept per page")
    parser.add_argument("--queries", type=int, default=100, help="labelled queries per set")
    parser.add_argument(
        "--rerank-queries",
        type=int,
        default=40,
        help="queries per set asked again with rerank (~3 s each per pipeline)",
    )
    parser.add_argument(
        "--scale", type=int, default=100_000, help="chunks in the scale test (0: none)"
    )
    parser.add_argument(
        "--random-vectors",
        action="store_true",
        help="scale chunks get random unit vectors, not embeddings (minutes, not an hour): "
        "their latencies stand, their HNSW recall says nothing of real text",
    )
    parser.add_argument("--modes", default="dense,keyword,hybrid", help="search modes to measure")
    parser.add_argument("--no-rerank", action="store_true", help="skip the reranked runs")
    add_output_options(
        parser,
        "40 pages, 40 packages, 5 queries each, 500 random-vector scale chunks, dense only, "
        "no reranker",
    )
    options = parser.parse_args()
    if options.smoke:
        options.docs, options.packages, options.queries, options.scale = 40, 40, 5, 500
        options.random_vectors, options.no_rerank, options.modes = True, True, "dense"
    rerank_queries = 0 if options.no_rerank else options.rerank_queries

    sets = labelled_sets(options)
    for name, labelled_set in sets.items():
        print(f"{name}: {len(labelled_set['docs'])} documents", flush=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-retrieval-")) / "pgdata"
    config = with_args(load_config(ROOT / options.config), store={"data_dir": str(data_dir)})
    args = config["applications"][0]["args"]
    app_config = AppConfig(**args)
    store_config, model = app_config.store, app_config.embedder.model

    with in_process(config) as base_url:
        for labelled_set in sets.values():
            collection = labelled_set["collection"]
            labelled_set["ingest"] = ingest_http(base_url, collection, labelled_set["docs"])
            print(f"ingest {collection}: {labelled_set['ingest']}", flush=True)
            asyncio.run(
                copy_collection(store_config, collection, f"{collection}-english", "english")
            )
            labelled_set["quality"], labelled_set["rerank"] = quality(
                base_url,
                {"simple": collection, "english": f"{collection}-english"},
                labelled_set["queries"],
                options.modes.split(","),
                rerank_queries,
            )
            labelled_set["vectors"] = embed_queries(
                base_url, [q["query"] for q in labelled_set["queries"]]
            )
        chunk_texts = asyncio.run(sample_chunks(store_config, 2000))
        raw = raw_embedding(args, chunk_texts)
        print(f"raw embedding: {raw:.1f} chunks/s", flush=True)

    man = sets["man pages"]
    man_name = f"man pages ({man['ingest']['chunks']} chunks)"
    latency = {man_name: asyncio.run(latency_and_recall(store_config, "man", man["vectors"]))}
    modes = {
        f"{name} ({s['ingest']['chunks']} chunks)": asyncio.run(
            mode_latency(
                store_config, s["collection"], [q["query"] for q in s["queries"]], s["vectors"]
            )
        )
        for name, s in sets.items()
    }
    if "hybrid" in options.modes.split(","):
        for s in sets.values():
            collections = {"simple": s["collection"], "english": f"{s['collection']}-english"}
            s["fusion"] = asyncio.run(
                fusion_sweep(store_config, collections, s["queries"], s["vectors"])
            )
    if options.scale:
        sentences = sentences_of(man["docs"], options.scale)
        if options.random_vectors:
            rng = np.random.default_rng(0)
            vectors = rng.standard_normal((len(sentences), man["vectors"].shape[1]))
            vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        else:
            vectors = scale_vectors(args, sentences)
        asyncio.run(load_scale(store_config, model, sentences, vectors))
        name = f"sentences ({len(sentences)} chunks)"
        if options.random_vectors:
            name += ", random vectors"
        latency[name] = asyncio.run(latency_and_recall(store_config, "scale", man["vectors"]))
        modes[name] = asyncio.run(
            mode_latency(
                store_config, "scale", [q["query"] for q in man["queries"]], man["vectors"]
            )
        )
    stop_embedded(data_dir)
    for name, rows in latency.items():
        print(name, rows, flush=True)

    retrieval, reranker = app_config.retrieval, app_config.reranker
    report = {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, no GPU",
        "sets": {
            name: {
                "corpus": s["corpus"],
                "documents": len(s["docs"]),
                "queries": len(s["queries"]),
                "ingest": s["ingest"],
                "quality": s["quality"],
                "rerank": s["rerank"],
                "fusion": s.get("fusion", []),
            }
            for name, s in sets.items()
        },
        "reranker": f"{reranker.backend}, {reranker.model}",
        "index": f"HNSW per collection, vector_cosine_ops, m={store_config.hnsw_m}, "
        f"ef_construction={store_config.hnsw_ef_construction}",
        "raw_chunks_per_s": raw,
        "ingest_ratio": man["ingest"]["chunks_per_s"] / raw,
        "latency": latency,
        "fusion": f"reciprocal rank fusion, k={retrieval.rrf_k}, {retrieval.candidates} "
        "candidates from each side",
        "fusion_defaults": [retrieval.rrf_k, retrieval.candidates],
        "mode_latency": modes,
    }
    write_report(report, "retrieval", markdown, output_dir(options))


async def sample_chunks(store_config: StoreConfig, n: int) -> list[str]:
    store = await open_store(store_config)
    try:
        async with store.pool.connection() as conn:
            rows = await (
                await conn.execute("SELECT text FROM chunks ORDER BY id LIMIT %s", (n,))
            ).fetchall()
        return [r[0] for r in rows]
    finally:
        await store.close()


if __name__ == "__main__":
    main()
