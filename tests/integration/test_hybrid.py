"""Keyword and hybrid search: the store against real PostgreSQL (no Ray), then over HTTP."""

import asyncio
import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

from serve_app.config import StoreConfig
from serve_app.contracts import DocumentChunks
from serve_app.errors import InvalidData, TextSearchMismatch
from serve_app.store import open_store
from serve_app.store.schema import MIGRATIONS, migrate
from serve_app.store.text_search import any_term, idf, quote
from tests.postgres import external_postgres

pytestmark = pytest.mark.integration


def run(coro):
    return asyncio.run(coro)


def unit(rows) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def external():
    with external_postgres() as url:
        yield StoreConfig(database_url=url)


def test_the_migration_indexes_the_words_of_existing_chunks():
    """Chunks stored before keyword search existed are found by it after the migration."""
    with external_postgres() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_migrations (version int PRIMARY KEY)")
            for version, sql in MIGRATIONS[:4]:
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations VALUES (%s)", (version,))
            conn.execute(
                "INSERT INTO collections (name, embedding_model, dimensions) VALUES ('old', 'm', 3)"
            )
            conn.execute("INSERT INTO documents (collection_id, id) VALUES (1, 'a')")
            conn.execute(
                "INSERT INTO chunks (collection_id, document_id, ordinal, text, embedding)"
                " VALUES (1, 'a', 0, 'Article 750 of the Civil Act', '[1,0,0]')"
            )
        assert migrate(url) == MIGRATIONS[-1][0] >= 5

        async def check() -> None:
            store = await open_store(StoreConfig(database_url=url))
            try:
                old = await store.collection("old")
                assert old.text_search_config == "simple"
                hits = await store.keyword_search(old, "civil act 750", 5)
                assert [h.document_id for h in hits] == ["a"]
                async with store.connection() as conn:
                    stats = await (
                        await conn.execute(
                            "SELECT (SELECT chunks FROM collections WHERE id = %s),"
                            " (SELECT jsonb_object_agg(term, chunks) FROM term_stats"
                            "  WHERE collection_id = %s)",
                            (old.id, old.id),
                        )
                    ).fetchone()
                # The statistics of chunks stored before they existed are filled in.
                assert stats == (
                    1,
                    {"article": 1, "750": 1, "of": 1, "the": 1, "civil": 1, "act": 1},
                )
                assert hits[0].keyword_score > 0 and hits[0].dense_score is None
            finally:
                await store.close()

        run(check())
        with psycopg.connect(url) as conn:
            plan = conn.execute(
                "EXPLAIN SELECT id FROM chunks WHERE tsv @@ 'civil'::tsquery AND collection_id = 1"
            ).fetchall()
            indexes = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'chunks_tsv'"
            ).fetchone()
    assert indexes and "gin (tsv)" in indexes[0]
    assert plan  # the query plans (the GIN index is used once the table is large)


LEGAL = [
    ("civil", "Article 750 of the Civil Act: liability for damages from unlawful acts.", "law"),
    ("labor", "The Labor Standards Act sets minimum working conditions and wages.", "law"),
    ("case", "Supreme Court decision 2019Da12345 on unlawful dismissal of workers.", "court"),
    ("recipe", "Bake the bread at 220 degrees until the crust is golden.", "food"),
]


async def legal_store(config: StoreConfig, name: str, text_search_config: str | None = None):
    store = await open_store(config)
    collection = await store.ensure_collection(name, "m", 3, text_search_config)
    vectors = unit(np.eye(4, 3) + 0.1)
    await store.replace_documents(
        collection,
        [
            DocumentChunks(doc, {"kind": kind}, [text], vectors[i : i + 1])
            for i, (doc, text, kind) in enumerate(LEGAL)
        ],
    )
    return store, await store.collection(name)


def test_keyword_search_finds_exact_terms_phrases_and_honours_exclusions(external):
    async def check() -> None:
        store, legal = await legal_store(external, "legal")
        try:
            found = await store.keyword_search(legal, "2019Da12345", 10)
            assert [h.document_id for h in found] == ["case"]
            # Any of the words: the passage holding more of them ranks first.
            found = await store.keyword_search(legal, "unlawful dismissal ruling", 10)
            assert [h.document_id for h in found] == ["case", "civil"]
            assert found[0].keyword_score > found[1].keyword_score
            # A quoted phrase matches only in that order; "-" excludes.
            found = await store.keyword_search(legal, '"civil act"', 10)
            assert [h.document_id for h in found] == ["civil"]
            assert await store.keyword_search(legal, '"act civil"', 10) == []
            found = await store.keyword_search(legal, "unlawful -dismissal", 10)
            assert [h.document_id for h in found] == ["civil"]
            # The same metadata filters as dense search.
            found = await store.keyword_search(legal, "unlawful", 10, {"kind": "court"})
            assert [h.document_id for h in found] == ["case"]
            # Punctuation alone, or nothing but an exclusion: no query, no rows, no error.
            assert await store.keyword_search(legal, "?!", 10) == []
            assert await store.keyword_search(legal, "-bread", 10) == []
        finally:
            await store.close()

    run(check())


def test_a_rare_word_outweighs_a_common_one_repeated(external):
    """`ts_rank_cd` alone weighs words alike: the chunk saying "the" five times would win."""

    async def check() -> None:
        store = await open_store(external)
        try:
            rarity = await store.ensure_collection("rarity", "m", 3)
            texts = {
                "chatty": "the cat sat on the mat by the door of the house in the sun",
                "chmod": "chmod changes file mode bits",
                **{f"filler{i}": f"the note number {i}" for i in range(8)},
            }
            vectors = unit(np.ones((len(texts), 3)))
            await store.replace_documents(
                rarity,
                [
                    DocumentChunks(name, {}, [text], vectors[i : i + 1])
                    for i, (name, text) in enumerate(texts.items())
                ],
            )
            hits = await store.keyword_search(await store.collection("rarity"), "the chmod", 3)
            assert hits[0].document_id == "chmod"
            assert hits[0].keyword_score > 2 * hits[1].keyword_score
        finally:
            await store.close()

    run(check())


def test_a_collection_keeps_its_text_search_configuration(external):
    async def check() -> None:
        store, english = await legal_store(external, "english", "english")
        try:
            assert english.text_search_config == "english"
            # Stemming: "baking" finds "Bake"; stop words alone are no query.
            found = await store.keyword_search(english, "baking", 10)
            assert [h.document_id for h in found] == ["recipe"]
            assert await store.keyword_search(english, "the of and", 10) == []
        finally:
            await store.close()
        store, simple = await legal_store(external, "plain")
        try:
            assert await store.keyword_search(simple, "baking", 10) == []
            with pytest.raises(TextSearchMismatch):
                await store.ensure_collection("english", "m", 3, "simple")
            assert (await store.ensure_collection("english", "m", 3)).id == english.id
            # A new collection that names none gets the default it is given; an existing one
            # keeps its own.
            fresh = await store.ensure_collection("fresh", "m", 3, None, "english")
            assert fresh.text_search_config == "english"
            kept = await store.ensure_collection("plain", "m", 3, None, "english")
            assert kept.text_search_config == "simple"
            with pytest.raises(InvalidData):
                await store.ensure_collection("klingon", "m", 3, "klingon")
            with pytest.raises(InvalidData):
                await store.ensure_collection("klingon", "m", 3, None, "klingon")
            assert "klingon" not in {c["name"] for c in await store.list_collections()}
        finally:
            await store.close()

    run(check())


def test_hybrid_fuses_both_lists_and_reports_each_score(external):
    async def check() -> None:
        store, legal = await legal_store(external, "fused")
        try:
            # The vector points at "labor", the words at "case".
            vector = unit([[0.1, 1.1, 0.1]])[0]
            dense = await store.search(legal, vector, 4)
            assert dense[0].document_id == "labor"
            hits = await store.hybrid_search(legal, vector, "2019Da12345", 4, rrf_k=60)
            by_id = {h.document_id: h for h in hits}
            assert len(hits) == 4 and set(by_id) == {"civil", "labor", "case", "recipe"}
            case = by_id["case"]
            assert case.keyword_score > 0 and case.dense_score is not None
            assert case.score == pytest.approx(1 / (60 + 1) + 1 / (60 + dense_rank(dense, "case")))
            assert by_id["labor"].keyword_score is None and by_id["labor"].dense_score > 0
            assert [h.fused_rank for h in hits] == [1, 2, 3, 4]
            assert hits[0].document_id in {"case", "labor"}
            # Both sides take the filters.
            hits = await store.hybrid_search(legal, vector, "unlawful", 4, {"kind": "law"})
            assert {h.document_id for h in hits} == {"civil", "labor"}
        finally:
            await store.close()

    run(check())


def dense_rank(dense_hits, document_id: str) -> int:
    ids = [h.document_id for h in dense_hits]
    return ids.index(document_id) + 1 if document_id in ids else 10**9


def test_selective_filters_and_wide_candidate_lists_still_return_top_k(external):
    """HNSW alone stops at `ef_search` rows, and a filter passing few of them leaves fewer
    than `top_k`: iterative scans (pgvector 0.8) and a dense side at least `candidates`
    wide keep the answers full."""

    async def check() -> None:
        store = await open_store(external)
        try:
            with psycopg.connect(external.database_url) as conn:
                version = conn.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
                ).fetchone()[0]
            assert tuple(int(p) for p in version.split(".")[:2]) >= (0, 8)
            many = await store.ensure_collection("many", "m", 8)
            rng = np.random.default_rng(0)
            vectors = unit(rng.normal(size=(3000, 8)))
            docs = [
                DocumentChunks(f"d{i}", {"rare": i % 150 == 0}, [f"chunk {i}"], vectors[i : i + 1])
                for i in range(3000)
            ]
            await store.replace_documents(many, docs)
            query = unit(rng.normal(size=(1, 8)))[0]
            rare = await store.search(many, query, 10, {"rare": True}, ef_search=10)
            assert len(rare) == 10 and all(h.metadata["rare"] for h in rare)
            # No word matches: the hybrid answer is the dense list, 30 deep at ef_search 10.
            wide = await store.hybrid_search(many, query, "zzz", 30, ef_search=10, candidates=40)
            assert len(wide) == 30 and all(h.keyword_score is None for h in wide)
        finally:
            await store.close()

    run(check())


KOREAN = json.loads((Path(__file__).parent / "korean_retrieval.json").read_text())


def test_korean_words_are_found_in_their_other_forms(external):
    """Korean joins particles and compounds to words (손해배상청구권은): whole-token matching
    misses most questions; character bigrams find the labelled passage first."""

    async def check() -> dict[str, float]:
        store = await open_store(external)
        try:
            korean = await store.ensure_collection("korean", "m", 3)
            names = list(KOREAN["documents"])
            vectors = unit(np.ones((len(names), 3)))
            await store.replace_documents(
                korean,
                [
                    DocumentChunks(name, {}, [KOREAN["documents"][name]], vectors[i : i + 1])
                    for i, name in enumerate(names)
                ],
            )
            first = {"bigrams": 0, "tokens": 0}
            async with store.connection() as conn:
                for query, label in KOREAN["queries"]:
                    hits = await store.keyword_search(korean, query, 3)
                    first["bigrams"] += bool(hits) and hits[0].document_id == label
                    # Whole space-separated tokens only, as the index would be without bigrams.
                    parsed = await (
                        await conn.execute(
                            "SELECT websearch_to_tsquery('simple', %s)::text", (query,)
                        )
                    ).fetchone()
                    row = await (
                        await conn.execute(
                            "SELECT document_id FROM chunks WHERE collection_id = %s"
                            " AND to_tsvector('simple', text) @@ %s::tsquery ORDER BY"
                            " ts_rank_cd(to_tsvector('simple', text), %s::tsquery) DESC LIMIT 1",
                            (korean.id, any_term(parsed[0]), any_term(parsed[0])),
                        )
                    ).fetchone()
                    first["tokens"] += row is not None and row[0] == label
            return {k: v / len(KOREAN["queries"]) for k, v in first.items()}
        finally:
            await store.close()

    recall_at_1 = run(check())
    assert len(KOREAN["queries"]) >= 30
    assert recall_at_1["bigrams"] >= 0.9, recall_at_1
    assert recall_at_1["tokens"] <= 0.6, recall_at_1


# --- over HTTP ------------------------------------------------------------------------------
CODES = [
    {"id": "e1", "text": "Error E4521 means the disk quota is exceeded.", "metadata": {"k": 1}},
    {"id": "e2", "text": "Storage space ran out on the volume.", "metadata": {"k": 2}},
    {"id": "e3", "text": "Error E7700 means the network is unreachable.", "metadata": {"k": 1}},
]


@pytest.fixture(scope="module")
def codes(server):
    import httpx

    with httpx.Client(base_url=server, timeout=300) as client:
        response = client.post("/v1/documents", json={"collection": "codes", "documents": CODES})
        assert response.status_code == 200, response.text
        yield client
        client.delete("/v1/collections/codes")


def test_each_mode_answers_with_its_scores_and_is_cached_apart(codes):
    def search(**extra) -> dict:
        body = {"collection": "codes", "query": "E4521", "top_k": 3, **extra}
        response = codes.post("/v1/search", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    keyword = search(mode="keyword")
    assert keyword["mode"] == "keyword"
    assert [r["document_id"] for r in keyword["results"]] == ["e1"]
    assert keyword["results"][0]["keyword_score"] > 0
    assert keyword["timings"]["embed_ms"] == 0  # nothing embedded
    dense = search(mode="dense")
    assert dense["mode"] == "dense" and not dense["cached"]  # not the keyword answer
    assert len(dense["results"]) == 3
    assert all(r["keyword_score"] is None and r["fused_rank"] is None for r in dense["results"])
    hybrid = search()  # the default mode
    assert hybrid["mode"] == "hybrid"
    assert hybrid["results"][0]["document_id"] == "e1"
    top = hybrid["results"][0]
    assert top["dense_score"] is not None and top["keyword_score"] > 0 and top["fused_rank"] == 1
    assert search(mode="hybrid")["cached"]  # the same request as the default's
    filtered = search(mode="hybrid", filters={"k": 2})
    assert [r["document_id"] for r in filtered["results"]] == ["e2"]


def test_a_new_collection_gets_the_services_text_search_configuration(codes):
    """`retrieval.text_search_config` (english): "exceeding quotas" finds "quota is exceeded"
    by its stems, which `simple` would not."""
    response = codes.post(
        "/v1/search",
        json={"collection": "codes", "query": "exceeding quotas", "mode": "keyword"},
    )
    assert response.status_code == 200, response.text
    assert [r["document_id"] for r in response.json()["results"]] == ["e1"]


def test_rag_takes_a_mode_and_unknown_modes_are_refused(codes):
    response = codes.post(
        "/v1/rag/query",
        json={
            "collection": "codes",
            "query": "What is E7700?",
            "mode": "keyword",
            "rerank": False,
            "max_tokens": 8,
        },
    )
    assert response.status_code == 200, response.text
    assert [c["document_id"] for c in response.json()["citations"]] == ["e3"]
    response = codes.post("/v1/search", json={"collection": "codes", "query": "x", "mode": "bm25"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "mode"
    response = codes.post(
        "/v1/documents",
        json={"collection": "codes2", "documents": CODES, "text_search_config": "Robert'); --"},
    )
    assert response.status_code == 400


async def stats_and_truth(store, collection) -> tuple[tuple, tuple]:
    """The collection's term statistics, and the same counted from its chunks."""
    async with store.connection() as conn:
        kept = await (
            await conn.execute(
                "SELECT (SELECT chunks FROM collections WHERE id = %s),"
                " (SELECT coalesce(jsonb_object_agg(term, chunks), '{}') FROM term_stats"
                "  WHERE collection_id = %s)",
                (collection.id, collection.id),
            )
        ).fetchone()
        counted = await (
            await conn.execute(
                "SELECT (SELECT count(*) FROM chunks WHERE collection_id = %s),"
                " (SELECT coalesce(jsonb_object_agg(lexeme, n), '{}') FROM"
                "  (SELECT lexeme, count(*) AS n FROM chunks, unnest(tsv)"
                "   WHERE collection_id = %s GROUP BY lexeme) c)",
                (collection.id, collection.id),
            )
        ).fetchone()
    return tuple(kept), tuple(counted)


def test_term_statistics_follow_ingest_replace_and_delete(external):
    async def check() -> None:
        store, legal = await legal_store(external, "statistics")
        try:
            kept, counted = await stats_and_truth(store, legal)
            assert kept == counted
            assert kept[0] == 4 and kept[1]["unlawful"] == 2 and kept[1]["bread"] == 1
            # A new version of a document replaces its words; a new document adds its own.
            await store.replace_documents(
                legal,
                [
                    DocumentChunks(
                        "recipe", {}, ["Knead the dough", "Bake the loaf"], unit(np.ones((2, 3)))
                    ),
                    DocumentChunks("extra", {}, ["Unlawful dough"], unit(np.ones((1, 3)))),
                ],
            )
            kept, counted = await stats_and_truth(store, legal)
            assert kept == counted
            assert kept[0] == 6 and kept[1]["unlawful"] == 3 and kept[1]["dough"] == 2
            assert "bread" not in kept[1]  # its last chunk went: no row of 0
            assert await store.delete_document(legal, "extra")
            kept, counted = await stats_and_truth(store, legal)
            assert kept == counted and kept[0] == 5 and kept[1]["dough"] == 1
            await store.delete_collection("statistics")
            async with store.connection() as conn:
                left = await (
                    await conn.execute(
                        "SELECT count(*) FROM term_stats WHERE collection_id = %s", (legal.id,)
                    )
                ).fetchone()
            assert left == (0,)
        finally:
            await store.close()

    run(check())


def test_term_statistics_stay_exact_under_concurrent_ingests_and_deletes(external):
    """Writers of one collection, at once on several connections: every count still matches
    the chunks, and none failed (no deadlock, no lost update)."""

    async def check() -> None:
        store = await open_store(external.model_copy(update={"pool_size": 6}))
        try:
            busy = await store.ensure_collection("busy", "m", 3)
            words = ["alpha", "beta", "gamma", "delta", "epsilon"]

            def doc(i: int, round_: int) -> DocumentChunks:
                texts = [
                    f"{words[(i + j + round_) % 5]} {words[(i * j) % 5]} note{i}" for j in range(3)
                ]
                return DocumentChunks(f"d{i}", {}, texts, unit(np.ones((3, 3))))

            for round_ in range(3):
                await asyncio.gather(
                    *(store.replace_documents(busy, [doc(i, round_)]) for i in range(8)),
                    *(store.delete_document(busy, f"d{i}") for i in range(0, 8, 3 + round_)),
                )
                kept, counted = await stats_and_truth(store, busy)
                assert kept == counted
        finally:
            await store.close()

    run(check())


def test_ranking_reads_each_words_rarity_from_the_statistics(external):
    """A chunk's keyword score is the idf of the words it holds, as the statistics give them
    (plus less than 0.1 of ts_rank_cd); changing a count changes the ranking."""

    async def check() -> None:
        store = await open_store(external)
        try:
            rarity = await store.ensure_collection("idf", "m", 3)
            texts = {
                "both": "kernel module loader",
                "kernel": "kernel panic",
                "module": "module list",
                **{f"m{i}": f"module note {i}" for i in range(6)},
            }
            vectors = unit(np.ones((len(texts), 3)))
            await store.replace_documents(
                rarity,
                [
                    DocumentChunks(name, {}, [text], vectors[i : i + 1])
                    for i, (name, text) in enumerate(texts.items())
                ],
            )
            hits = await store.keyword_search(rarity, "kernel module", 3)
            assert [h.document_id for h in hits] == ["both", "kernel", "module"]
            n = len(texts)
            assert 0 <= hits[0].keyword_score - idf(2, n) - idf(8, n) < 0.1
            assert 0 <= hits[1].keyword_score - idf(2, n) < 0.1
            assert 0 <= hits[2].keyword_score - idf(8, n) < 0.1
            # Say "module" is the rare word: the chunk holding only it now ranks second.
            async with store.connection() as conn:
                await conn.execute(
                    "UPDATE term_stats SET chunks = 1 WHERE collection_id = %s AND term = 'module'",
                    (rarity.id,),
                )
            hits = await store.keyword_search(rarity, "kernel module", 3)
            assert hits[1].document_id in {"module", *(f"m{i}" for i in range(6))}
            assert 0 <= hits[1].keyword_score - idf(1, n) < 0.1
        finally:
            await store.close()

    run(check())


def test_the_shortlist_ranks_as_scoring_every_match_would(external, monkeypatch):
    """`ts_rank_cd` runs only where it can still lift a chunk into the answer: the top 10 are
    those of scoring every matching chunk in full."""
    import serve_app.store.vector_store as vector_store

    monkeypatch.setattr(vector_store, "KEYWORD_CANDIDATES", 10**9)

    async def check() -> None:
        store = await open_store(external)
        try:
            many = await store.ensure_collection("shortlist", "m", 3)
            rng = np.random.default_rng(3)
            vocabulary = [f"w{i}" for i in range(30)]
            weights = 1.0 / np.arange(1, 31)
            texts = [
                " ".join(
                    rng.choice(vocabulary, size=rng.integers(3, 12), p=weights / weights.sum())
                )
                for _ in range(400)
            ]
            await store.replace_documents(
                many,
                [
                    DocumentChunks(f"d{i}", {}, [t], unit(np.ones((1, 3))))
                    for i, t in enumerate(texts)
                ],
            )
            for query in ("w0 w3 w17", "w1 w2", "w29 w5 w0 w8"):
                hits = await store.keyword_search(many, query, 10)
                words = [quote(w) for w in query.split()]
                anything = " | ".join(words)
                async with store.connection() as conn:
                    params: list = []
                    for word in words:
                        params += [await idf_of(conn, many, word), word]
                    weights = " + ".join(["%s * (tsv @@ %s::tsquery)::int"] * len(words))
                    full = await (
                        await conn.execute(
                            f"SELECT id, {weights} + 0.1 * ts_rank_cd(tsv, %s::tsquery, 32)"
                            " AS score FROM chunks WHERE collection_id = %s"
                            " AND tsv @@ %s::tsquery ORDER BY score DESC, id LIMIT 10",
                            [*params, anything, many.id, anything],
                        )
                    ).fetchall()
                assert [h.chunk_id for h in hits] == [row[0] for row in full]
                assert [h.keyword_score for h in hits] == pytest.approx([row[1] for row in full])
        finally:
            await store.close()

    run(check())


async def idf_of(conn, collection, term: str) -> float:
    """A term's idf counted from the chunks themselves."""
    row = await (
        await conn.execute(
            "SELECT (SELECT count(*) FROM chunks WHERE collection_id = %s),"
            " (SELECT count(*) FROM chunks WHERE collection_id = %s AND tsv @@ %s::tsquery)",
            (collection.id, collection.id, term),
        )
    ).fetchone()
    return idf(row[1], row[0])


METADATA = [
    {"kind": "law", "year": 2019, "score": 1.5, "tags": ["a", "b"], "nested": {"x": None}},
    {"kind": "recipe", "title": '김치찌개 "spicy" \\ stew', "ok": True},
    {},
]


def test_hybrid_hits_are_those_of_each_side_with_their_metadata(external):
    async def check() -> None:
        store = await open_store(external)
        try:
            collection = await store.ensure_collection("rows", "m", 4)
            rng = np.random.default_rng(0)
            vectors = rng.normal(size=(30, 4)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            docs = [
                DocumentChunks(
                    f"d{i}",
                    METADATA[i % len(METADATA)],
                    [f"stew number {i}", f"law {i} of the land"],
                    vectors[2 * i : 2 * i + 2],
                )
                for i in range(15)
            ]
            await store.replace_documents(collection, docs)
            query = vectors[3]
            dense = {h.chunk_id: h for h in await store.search(collection, query, 40)}
            keyword = {h.chunk_id: h for h in await store.keyword_search(collection, "stew", 40)}
            hits = await store.hybrid_search(collection, query, "stew", 8, candidates=40)
            assert len(hits) == 8
            for h in hits:
                side = dense.get(h.chunk_id) or keyword[h.chunk_id]
                assert (h.document_id, h.text, h.metadata) == (
                    side.document_id,
                    side.text,
                    side.metadata,
                )
                assert h.metadata == METADATA[int(h.document_id[1:]) % len(METADATA)]
        finally:
            await store.close()

    asyncio.run(check())
