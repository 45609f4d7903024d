"""Query counts and precomputed answers in PostgreSQL (tables of migration 3).

The ingress writes counts in batches and reads valid answers; the Precompute deployment ranks
the counts and writes answers. An answer is valid while its collection is at the version it
was computed for: every query here that reads answers joins on that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from serve_app.errors import InvalidData
from serve_app.precompute.keys import Asked
from serve_app.store.vector_store import VectorStore

# A row PostgreSQL refuses (a value it cannot hold): that row is skipped, not its batch.
REFUSED = (InvalidData, psycopg.DataError, psycopg.IntegrityError)


@dataclass(frozen=True)
class Ranked:
    """A popular request, with its collection's current version and its answer's state."""

    collection_id: int
    collection: str
    version: int
    kind: str
    key: str
    request: dict[str, Any]
    count: int
    answer_version: int | None  # None: no answer yet
    answer_age_s: float | None


@dataclass(frozen=True)
class Answer:
    """A precomputed answer, valid for its collection at `version`."""

    collection_id: int
    collection: str
    kind: str
    key: str
    version: int
    body: dict[str, Any]
    computed_at: datetime

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.computed_at.timestamp())


_ANSWER_COLUMNS = (
    "SELECT p.collection_id, c.name, p.kind, p.key, p.version, p.answer, p.computed_at"
    " FROM precomputed_answers p JOIN collections c"
    " ON c.id = p.collection_id AND c.version = p.version"
)


class PopularStore:
    """The counts and answers tables, on the document store's pool."""

    def __init__(self, store: VectorStore) -> None:
        self.store = store

    async def record(self, counts: list[tuple[Asked, int]]) -> list[Asked]:
        """Add to each request's count; requests of collections that no longer exist are
        dropped. Returns the requests whose rows PostgreSQL refused: the batch is written in
        one transaction, and where it is refused, again row by row without them."""
        rows = [(a.kind, a.key, a.query, Jsonb(a.request), n, a.collection) for a, n in counts]
        if not rows:
            return []
        try:
            await self._insert(rows)
            return []
        except REFUSED:
            pass
        refused = []
        for (asked, _), row in zip(counts, rows, strict=True):
            try:
                await self._insert([row])
            except REFUSED:
                refused.append(asked)
        return refused

    async def _insert(self, rows: list[tuple]) -> None:
        async with self.store.connection(transaction=True) as conn, conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO query_counts (collection_id, kind, key, query, request, count)"
                " SELECT id, %s, %s, %s, %s, %s FROM collections WHERE name = %s"
                " ON CONFLICT (collection_id, kind, key) DO UPDATE"
                " SET count = query_counts.count + EXCLUDED.count, last_seen = now()",
                rows,
            )

    async def ranked(
        self, kinds: list[str], top_n: int, min_count: int, window_s: float
    ) -> list[Ranked]:
        """The `top_n` most asked requests of `kinds` asked within `window_s`."""
        async with self.store.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT q.collection_id, c.name, c.version, q.kind, q.key, q.request,"
                    " q.count, p.version, extract(epoch FROM now() - p.computed_at)::float8"
                    " FROM query_counts q JOIN collections c ON c.id = q.collection_id"
                    " LEFT JOIN precomputed_answers p USING (collection_id, kind, key)"
                    " WHERE q.kind = ANY(%s) AND q.count >= %s"
                    " AND q.last_seen > now() - make_interval(secs => %s)"
                    " ORDER BY q.count DESC, q.last_seen DESC LIMIT %s",
                    (kinds, min_count, window_s, top_n),
                )
            ).fetchall()
        return [Ranked(*row) for row in rows]

    async def prune(self, keep: list[Ranked], window_s: float) -> int:
        """Drop answers of requests no longer ranked and counts older than `window_s`;
        return how many answers went."""
        async with self.store.connection(transaction=True) as conn:
            cur = await conn.execute(
                "DELETE FROM precomputed_answers WHERE (collection_id, kind, key) NOT IN"
                " (SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[]))",
                (
                    [r.collection_id for r in keep],
                    [r.kind for r in keep],
                    [r.key for r in keep],
                ),
            )
            await conn.execute(
                "DELETE FROM query_counts WHERE last_seen < now() - make_interval(secs => %s)",
                (window_s,),
            )
            return cur.rowcount

    async def put(self, ranked: Ranked, body: dict[str, Any]) -> None:
        """Store an answer computed for `ranked` at its collection's `ranked.version`."""
        async with self.store.connection() as conn:
            await conn.execute(
                "INSERT INTO precomputed_answers (collection_id, kind, key, version, answer)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (collection_id, kind, key) DO UPDATE"
                " SET version = EXCLUDED.version, answer = EXCLUDED.answer, computed_at = now()",
                (ranked.collection_id, ranked.kind, ranked.key, ranked.version, Jsonb(body)),
            )

    async def answers(self) -> list[Answer]:
        """Every answer valid now."""
        async with self.store.connection() as conn:
            rows = await (await conn.execute(_ANSWER_COLUMNS)).fetchall()
        return [Answer(*row) for row in rows]

    async def answer(self, collection_id: int, kind: str, key: str) -> Answer | None:
        """One answer, if it exists and is valid now."""
        async with self.store.connection() as conn:
            row = await (
                await conn.execute(
                    _ANSWER_COLUMNS + " WHERE p.collection_id = %s AND p.kind = %s AND p.key = %s",
                    (collection_id, kind, key),
                )
            ).fetchone()
        return Answer(*row) if row else None
