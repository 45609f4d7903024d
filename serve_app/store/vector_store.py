"""VectorStore: collections, documents and their embedded chunks in PostgreSQL with pgvector.

Async, on a `psycopg_pool` pool whose connections have pgvector's types registered. Chunks go
in with binary COPY; a document's chunks are replaced in one transaction; each collection has
its own HNSW index (cosine) over its own embedding dimension. Chunks are also searched by
keyword (a generated tsvector in the collection's text-search configuration, GIN-indexed),
and by both at once, fused by reciprocal rank (serve_app/store/text_search.py).

Keyword ranking weighs words by their rarity, read from term statistics: per collection, its
chunk count (`collections.chunks`) and each lexeme's chunks (`term_stats`), kept by a trigger
on `chunks` in the transaction that writes them (serve_app/store/schema.py, migration 6). Chosen
over counting a query's words in the GIN index (a cost that grows with the collection: the p50
at 100k chunks in docs/benchmarks/retrieval.md) and over materializing `ts_stat` (a recount of
the whole collection after each change, stale in between): the counts are exact at every
commit, roll back with the rows they count, and need no refresh. Writers of one collection
already take its row lock first, so keeping them adds no lock and cannot deadlock. A query
reads the statistics and the chunks in two statements: a change committed between the two may
shift an idf by that change, never what a result matched.

Every query is parameterized. The only values written into SQL text are integers read back
from the database (a collection's id and dimensions) and validated integers from the config.

While the database is unreachable every call fails fast with `StoreUnavailable` (503); each
connection is checked as it leaves the pool, so the first call after the database is back
succeeds, and a store opened while the database was down migrates on its first call.

Concurrency: every change to a collection's documents first locks the collection's row (the
version bump), and deleting a collection deletes that row first, so the two serialize in one
order and never deadlock; a change whose collection was deleted meanwhile answers 409 (or
404), never 500. Only a new collection's CREATE INDEX locks `chunks` against writes, under
`lock_timeout` (then 503 `store_busy`); an existing collection's ingest takes row locks only.
A deleted collection's index is dropped CONCURRENTLY after the delete has committed, so
searches and ingests of other collections never wait behind a delete (a new collection's
CREATE INDEX does wait for that drop, within its `lock_timeout`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from serve_app.contracts import Collection, DocumentChunks, Hit
from serve_app.errors import (
    CollectionChanged,
    CollectionNotFound,
    InvalidData,
    ModelMismatch,
    StoreBusy,
    StoreError,
    StoreUnavailable,
    TextSearchMismatch,
)
from serve_app.metrics import store_unavailable
from serve_app.store.schema import connect_timeout, lock_timeout_ms, migrate
from serve_app.store.text_search import (
    candidate_terms,
    cjk_bigrams,
    idf,
    lexemes,
    reciprocal_rank_fusion,
    terms,
)

logger = logging.getLogger("ray.serve")

_COLLECTION_COLUMNS = (
    "SELECT id, name, embedding_model, dimensions, version, uid::text, text_search_config::text"
    " FROM collections"
)
# Index names are `chunks_hnsw_<collection id>`; ids are never reused.
_INDEX_PREFIX = "chunks_hnsw_"


# Chunks a keyword query scores at most, unless its rarest term alone is in more
# (text_search.candidate_terms): the cost of a query grows with them (docs/benchmarks/retrieval.md).
KEYWORD_CANDIDATES = 1000

# A search's row: chunk id, document id, text, metadata as JSON text (`metadata::text`), score.
# The metadata becomes a Hit's dict only for the hits returned: a hybrid search reads
# `candidates` rows from each side and returns `top_k`, and decoding every row's metadata,
# with building a Hit for every fused candidate, took ~15% of this process's CPU time per
# hybrid search (3.5 -> 3.0 ms at 100k chunks; the two database backends share its 2 cores).
Row = tuple[int, str, str, str, float]


def _hit(row: Row, **scores: float | None) -> Hit:
    """A Hit of `row`, its metadata decoded, with `scores` (dense_score, keyword_score)."""
    chunk_id, document_id, text, metadata, score = row
    return Hit(chunk_id, document_id, text, json.loads(metadata), score, **scores)


@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 64


class VectorStore:
    def __init__(
        self, url: str, pool: AsyncConnectionPool, hnsw: HnswParams, timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.pool = pool
        self.hnsw = hnsw
        self.timeout_s = timeout_s
        self.migrated = False
        self._migrating = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        url: str,
        pool_size: int = 4,
        hnsw: HnswParams | None = None,
        timeout_s: float = 5.0,
        name: str = "rag-serve",
    ) -> VectorStore:
        """A pool of vector-aware connections, with the schema migrated (idempotent).

        Opens even while the database is down: calls answer 503 until it is back.
        """
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            configure=register_vector_async,
            check=AsyncConnectionPool.check_connection,
            timeout=timeout_s,
            # The pool retries a failed connection with a doubling delay until this passes,
            # then lets the next request try at once: kept short, so the first request after
            # an outage reconnects instead of waiting out a delay grown during it.
            reconnect_timeout=timeout_s,
            open=False,
            kwargs={
                "autocommit": True,
                "connect_timeout": connect_timeout(timeout_s),
                "application_name": name,  # who holds the connection, in pg_stat_activity
            },
        )
        await pool.open(wait=False)
        store = cls(url, pool, hnsw or HnswParams(), timeout_s)
        try:
            await store._migrate()
        except StoreUnavailable:
            logger.warning("The document store is unreachable; it migrates on its first call.")
        return store

    async def close(self) -> None:
        await self.pool.close()

    async def _migrate(self) -> None:
        async with self._migrating:
            if self.migrated:
                return
            try:
                await asyncio.to_thread(migrate, self.url, self.timeout_s)
            except psycopg.OperationalError as exc:
                raise StoreUnavailable("The document store is unavailable; retry shortly.") from exc
            self.migrated = True

    @asynccontextmanager
    async def connection(self, transaction: bool = False) -> AsyncIterator[Any]:
        """A pooled connection (in a transaction if asked); 503 when the database is down."""
        try:
            if not self.migrated:
                await self._migrate()
            async with self.pool.connection() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except psycopg.DataError as exc:  # a value the database refuses: the caller's input
            raise InvalidData(f"The database refused a value: {exc.sqlstate}.") from exc
        except (psycopg.errors.ForeignKeyViolation, psycopg.errors.TransactionRollback) as exc:
            # A row this call refers to went meanwhile, or a deadlock: a conflict with another
            # request, not an outage. (The locking order above should leave none; this keeps a
            # missed case a 409 rather than a 500 or a misleading 503.)
            raise CollectionChanged(
                "The collection changed while this request ran; send it again."
            ) from exc
        except psycopg.errors.LockNotAvailable as exc:
            raise StoreBusy("The document store is busy; retry shortly.") from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # Never the URL or the driver's message: either may hold the password.
            logger.warning("Document store unavailable: %s", type(exc).__name__)
            store_unavailable().inc()
            raise StoreUnavailable("The document store is unavailable; retry shortly.") from exc

    # --- collections ----------------------------------------------------------------------
    async def collection(self, name: str) -> Collection:
        async with self.connection() as conn:
            row = await (
                await conn.execute(_COLLECTION_COLUMNS + " WHERE name = %s", (name,))
            ).fetchone()
        if row is None:
            raise CollectionNotFound(f"The collection '{name}' does not exist.")
        return Collection(*row)

    async def ensure_collection(
        self,
        name: str,
        model: str,
        dimensions: int,
        text_search_config: str | None = None,
        new_text_search_config: str = "simple",
    ) -> Collection:
        """The collection `name`, created for `model` if new; vectors of models never mix.

        `text_search_config` (PostgreSQL's, e.g. `english`) is fixed when the collection is
        created (`new_text_search_config` when None): asking an existing one for another is a
        409.

        Only a new collection creates its index, in the transaction that creates it (so it
        is never seen without one); an existing one takes no lock on `chunks` here.
        """
        async with self.connection(transaction=True) as conn:
            try:
                created = await (
                    await conn.execute(
                        "INSERT INTO collections"
                        " (name, embedding_model, dimensions, text_search_config)"
                        " VALUES (%s, %s, %s, COALESCE(%s, %s)::regconfig)"
                        " ON CONFLICT (name) DO NOTHING RETURNING id",
                        (name, model, dimensions, text_search_config, new_text_search_config),
                    )
                ).fetchone()
            except psycopg.errors.UndefinedObject as exc:
                raise InvalidData(
                    "There is no text-search configuration"
                    f" '{text_search_config or new_text_search_config}'."
                ) from exc
            row = await (
                await conn.execute(_COLLECTION_COLUMNS + " WHERE name = %s", (name,))
            ).fetchone()
            if row is None:  # deleted between the two statements
                raise CollectionChanged(
                    f"The collection '{name}' was deleted while this request ran; send it again."
                )
            collection = Collection(*row)
            if (collection.embedding_model, collection.dimensions) != (model, dimensions):
                raise ModelMismatch(
                    f"The collection '{name}' holds {collection.embedding_model} vectors "
                    f"({collection.dimensions}-d), not {model} ({dimensions}-d)."
                )
            if text_search_config not in (None, collection.text_search_config):
                raise TextSearchMismatch(
                    f"The collection '{name}' indexes keywords with the "
                    f"'{collection.text_search_config}' configuration, not '{text_search_config}'."
                )
            if created:
                # CREATE INDEX locks `chunks` against writes (SHARE): bounded, so a long
                # ingest elsewhere makes this one fail with 503 instead of queueing every
                # other ingest behind it. The id and dimensions are integers from the
                # database: safe to inline, and the literal id lets the planner match this
                # partial index.
                await conn.execute(f"SET LOCAL lock_timeout = {lock_timeout_ms(self.timeout_s)}")
                await conn.execute(
                    f"CREATE INDEX {_INDEX_PREFIX}{collection.id} ON chunks USING hnsw"
                    f" ((embedding::vector({collection.dimensions})) vector_cosine_ops)"
                    f" WITH (m = {self.hnsw.m}, ef_construction = {self.hnsw.ef_construction})"
                    f" WHERE collection_id = {collection.id}"
                )
        return collection

    async def versions(self) -> dict[int, int]:
        """Every collection's current version, by id."""
        async with self.connection() as conn:
            rows = await (await conn.execute("SELECT id, version FROM collections")).fetchall()
        return dict(rows)

    async def list_collections(self) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT c.name, c.embedding_model, c.dimensions, c.created_at,"
                    " (SELECT count(*) FROM documents d WHERE d.collection_id = c.id),"
                    " (SELECT count(*) FROM chunks k WHERE k.collection_id = c.id)"
                    " FROM collections c ORDER BY c.name"
                )
            ).fetchall()
        keys = ("name", "embedding_model", "dimensions", "created_at", "documents", "chunks")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def delete_collection(self, name: str) -> None:
        """Delete the collection and everything in it; 404 if there is none.

        The delete itself locks only the collection's rows (it waits for a change to this
        collection in flight, then commits). Its index goes afterwards, concurrently: a plain
        DROP INDEX would lock all of `chunks`, stopping every collection's searches.
        """
        async with self.connection() as conn:
            row = await (
                await conn.execute("DELETE FROM collections WHERE name = %s RETURNING id", (name,))
            ).fetchone()
        if row is None:
            raise CollectionNotFound(f"The collection '{name}' does not exist.")
        await self.drop_orphan_indexes()

    async def drop_orphan_indexes(self) -> list[str]:
        """Drop the indexes of collections that no longer exist; return their names.

        Each DROP INDEX CONCURRENTLY waits for the transactions using `chunks` but blocks none
        of them. One that fails or times out (a long ingest) is left for the next call: until
        then it is an index no query uses, and no row enters (ids are never reused).
        """
        async with self.connection() as conn:
            names = [
                row[0]
                for row in await (
                    await conn.execute(
                        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                        " WHERE i.indrelid = 'chunks'::regclass AND c.relname ~ %s"
                        " AND NOT EXISTS (SELECT 1 FROM collections"
                        "  WHERE id = substr(c.relname, %s)::bigint)",
                        (f"^{_INDEX_PREFIX}[0-9]+$", len(_INDEX_PREFIX) + 1),
                    )
                ).fetchall()
            ]
        dropped = []
        for index in names:
            try:
                async with self.connection() as conn:
                    limit = lock_timeout_ms(self.timeout_s)
                    await conn.execute(f"SET lock_timeout = {limit}")
                    await conn.execute(f"SET statement_timeout = {limit}")
                    try:
                        # A name matched by the pattern above: letters, "_" and digits only.
                        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
                    finally:
                        await conn.execute("RESET lock_timeout; RESET statement_timeout")
                dropped.append(index)
            except (psycopg.Error, StoreError) as exc:
                logger.warning("Index %s kept for later: %s", index, type(exc).__name__)
        return dropped

    # --- documents ------------------------------------------------------------------------
    async def replace_documents(self, collection: Collection, documents: list[DocumentChunks]):
        """Store `documents`, replacing any earlier version of each id, all in one transaction:
        a failure leaves every earlier version intact, never a mix."""
        ids = [d.id for d in documents]
        async with self.connection(transaction=True) as conn:
            text_search_config = await self._bump(conn, collection)
            if text_search_config is None:
                raise CollectionChanged(
                    f"The collection '{collection.name}' was deleted while this request ran;"
                    " nothing was stored. Send it again."
                )
            await conn.execute(
                "DELETE FROM documents WHERE collection_id = %s AND id = ANY(%s)",
                (collection.id, ids),
            )
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO documents (collection_id, id, metadata) VALUES (%s, %s, %s)",
                    [(collection.id, d.id, Jsonb(d.metadata)) for d in documents],
                )
                async with cur.copy(
                    "COPY chunks (collection_id, document_id, ordinal, text, metadata, embedding,"
                    " text_search_config) FROM STDIN WITH (FORMAT BINARY)"
                ) as copy:
                    # A regconfig travels as its oid (the same binary form).
                    copy.set_types(["int8", "text", "int4", "text", "jsonb", "vector", "oid"])
                    for d in documents:
                        metadata = Jsonb(d.metadata)
                        for ordinal, (text, vector) in enumerate(
                            zip(d.texts, d.embeddings, strict=True)
                        ):
                            await copy.write_row(
                                (
                                    collection.id,
                                    d.id,
                                    ordinal,
                                    text,
                                    metadata,
                                    vector,
                                    text_search_config,
                                )
                            )

    async def delete_document(self, collection: Collection, document_id: str) -> bool:
        """Delete one document; False (and the collection's version unchanged, so its cached
        and precomputed answers stay valid) if it was not there."""
        async with self.connection(transaction=True) as conn:
            # The collection's row first, as every change does: the same lock order as a
            # concurrent ingest or collection delete, so no deadlock.
            locked = await (
                await conn.execute(
                    "SELECT 1 FROM collections WHERE id = %s FOR NO KEY UPDATE", (collection.id,)
                )
            ).fetchone()
            if locked is None:
                raise CollectionNotFound(f"The collection '{collection.name}' does not exist.")
            cur = await conn.execute(
                "DELETE FROM documents WHERE collection_id = %s AND id = %s",
                (collection.id, document_id),
            )
            if cur.rowcount == 0:
                return False
            await self._bump(conn, collection)
            return True

    @staticmethod
    async def _bump(conn, collection: Collection) -> int | None:
        """A new version for the collection, its row locked until commit; the oid of its
        text-search configuration (what its chunks are indexed with), None if it is gone."""
        row = await (
            await conn.execute(
                "UPDATE collections SET version = version + 1 WHERE id = %s"
                " RETURNING text_search_config::oid",
                (collection.id,),
            )
        ).fetchone()
        return None if row is None else int(row[0])

    # --- search ---------------------------------------------------------------------------
    async def search(
        self,
        collection: Collection,
        vector: np.ndarray,
        top_k: int,
        filters: dict[str, Any] | None = None,
        ef_search: int = 80,
        exact: bool = False,
    ) -> list[Hit]:
        """The `top_k` chunks nearest to `vector` by cosine; `filters` is JSONB containment.

        HNSW by default (`ef_search` candidates; with filters, pgvector's iterative scan keeps
        looking until `top_k` rows pass them). `exact` scans every chunk instead.
        """
        rows = await self._nearest(collection, vector, top_k, filters, ef_search, exact)
        return [_hit(row, dense_score=row[4]) for row in rows]

    async def _nearest(
        self,
        collection: Collection,
        vector: np.ndarray,
        top_k: int,
        filters: dict[str, Any] | None,
        ef_search: int,
        exact: bool = False,
    ) -> list[Row]:
        """The rows of `search`, nearest first (by cosine similarity, the score)."""
        distance = f"embedding::vector({collection.dimensions}) <=> %(q)s"
        where = f"collection_id = {collection.id}"
        if filters:
            where += " AND metadata @> %(filters)s"
        sql = (
            f"SELECT id, document_id, text, metadata::text, 1 - ({distance}) AS score FROM chunks"
            f" WHERE {where} ORDER BY {distance} LIMIT %(k)s"
        )
        params = {"q": np.asarray(vector, dtype=np.float32), "k": top_k, "filters": Jsonb(filters)}
        async with self.connection(transaction=True) as conn:
            if exact:
                await conn.execute("SET LOCAL enable_indexscan = off")
            else:
                await conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
                if filters:
                    await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            rows = await (await conn.execute(sql, params)).fetchall()
        # relaxed_order may return near-ties slightly out of order.
        return sorted(rows, key=lambda row: row[4], reverse=True)

    async def keyword_search(
        self,
        collection: Collection,
        query: str,
        top_k: int,
        filters: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """The `top_k` chunks that best match `query`'s words.

        The query is parsed by `websearch_to_tsquery` in the collection's configuration
        ("quoted phrases", -excluded words, `or`); a chunk may then match any of its terms
        (Korean, Chinese and Japanese words also by their character bigrams). Its score is
        the sum of the BM25 idf of the terms it holds, plus a tenth of `ts_rank_cd`
        (normalized into [0, 1): how often and how close together) to order chunks holding
        the same terms.

        Each term's document frequency is read from the collection's term statistics
        (`term_stats`, kept by a trigger in the transaction that changes the chunks: see
        serve_app/store/schema.py), by primary key; a phrase counts as its rarest word (an
        upper bound on the chunks holding the phrase). The statistics and the chunks are read
        by two statements, so a change committed between them may show in one and not the
        other: an idf then errs by that change, and no result is wrong about what matched.

        Chunks become candidates by the rarest terms, within `KEYWORD_CANDIDATES` of their
        chunks together (`candidate_terms`). Every candidate gets its idf weight; the costly
        `ts_rank_cd` is computed only for those whose weight is within its 0.1 of the
        `top_k`-th best weight, the only ones it can lift into the answer.
        """
        rows = await self._keyword_rows(collection, query, top_k, filters)
        return [_hit(row, keyword_score=row[4]) for row in rows]

    async def _keyword_rows(
        self,
        collection: Collection,
        query: str,
        top_k: int,
        filters: dict[str, Any] | None,
    ) -> list[Row]:
        """The rows of `keyword_search`, best first (by their keyword score)."""
        async with self.connection() as conn:
            parsed = await (
                await conn.execute(
                    "SELECT websearch_to_tsquery(%s::regconfig, %s)::text",
                    (collection.text_search_config, query),
                )
            ).fetchone()
            wanted = terms(parsed[0] if parsed else "", cjk_bigrams(query))
            if not wanted.wanted:  # only stop words or punctuation: nothing to match
                return []
            total, df = await self._term_frequencies(conn, collection, wanted.wanted)
            present = {term: n for term, n in df.items() if n > 0}
            if not present:
                return []
            candidates = wanted.any_of(candidate_terms(present, KEYWORD_CANDIDATES))
            everything = wanted.any_of(list(present))
            weights = " + ".join(["%s * (tsv @@ %s::tsquery)::int"] * len(present))
            params: list[Any] = []
            for term, n in present.items():
                params += [idf(n, max(total, n)), term]
            where = f"collection_id = {collection.id} AND tsv @@ %s::tsquery"
            params.append(candidates)
            if filters:
                where += " AND metadata @> %s"
                params.append(Jsonb(filters))
            params += [top_k, everything, top_k]
            rows = await (
                await conn.execute(
                    "WITH matched AS MATERIALIZED ("
                    f" SELECT id, document_id, text, metadata, tsv, {weights} AS weight"
                    f" FROM chunks WHERE {where}),"
                    " cutoff AS (SELECT min(weight) AS weight FROM"
                    "  (SELECT weight FROM matched ORDER BY weight DESC LIMIT %s) best)"
                    " SELECT id, document_id, text, metadata::text,"
                    " weight + 0.1 * ts_rank_cd(tsv, %s::tsquery, 32) AS score"
                    " FROM matched WHERE weight > (SELECT weight FROM cutoff) - 0.1"
                    " ORDER BY score DESC, id LIMIT %s",
                    params,
                )
            ).fetchall()
        return rows

    async def _term_frequencies(
        self, conn, collection: Collection, wanted: list[str]
    ) -> tuple[int, dict[str, int]]:
        """The collection's chunk count, and each wanted term's chunks by its statistics (a
        phrase: its rarest word's; 0 for a word no chunk holds)."""
        words = {term: lexemes(term) for term in wanted}
        rows = await (
            await conn.execute(
                "SELECT term, chunks FROM term_stats"
                " WHERE collection_id = %s AND term = ANY(%s)"
                " UNION ALL SELECT NULL, chunks FROM collections WHERE id = %s",
                (collection.id, sorted({w for ws in words.values() for w in ws}), collection.id),
            )
        ).fetchall()
        counts = {term: int(n) for term, n in rows if term is not None}
        total = next((int(n) for term, n in rows if term is None), 0)
        return total, {
            term: min((counts.get(w, 0) for w in ws), default=0) for term, ws in words.items()
        }

    async def hybrid_search(
        self,
        collection: Collection,
        vector: np.ndarray,
        query: str,
        top_k: int,
        filters: dict[str, Any] | None = None,
        ef_search: int = 80,
        rrf_k: int = 5,
        candidates: int = 40,
    ) -> list[Hit]:
        """Dense and keyword candidates (`candidates` of each, the same `filters`), fused by
        reciprocal rank with constant `rrf_k`; the `top_k` first.

        The two searches run at once on two connections. HNSW returns at most `ef_search`
        rows, so the dense side searches at least `candidates` wide.

        The candidates are fused without their metadata; only the `top_k` hits returned
        decode theirs (from the row that fusion keeps: the dense side's where both hold it).
        """
        depth = max(top_k, candidates)
        dense, keyword = await asyncio.gather(
            self._nearest(collection, vector, depth, filters, max(ef_search, depth)),
            self._keyword_rows(collection, query, depth, filters),
        )
        metadata: dict[int, str] = {}
        for row in (*dense, *keyword):
            metadata.setdefault(row[0], row[3])
        fused = reciprocal_rank_fusion(
            [Hit(*row[:3], {}, row[4], dense_score=row[4]) for row in dense],
            [Hit(*row[:3], {}, row[4], keyword_score=row[4]) for row in keyword],
            rrf_k,
            limit=top_k,
        )
        return [replace(hit, metadata=json.loads(metadata[hit.chunk_id])) for hit in fused]
