"""The store's schema as numbered migrations, applied once each and recorded.

Every replica may call `migrate` at start: an advisory lock serializes them, and each
migration runs in the same transaction as its record, so a failed one leaves no trace.
"""

from __future__ import annotations

import math

import psycopg

# Any fixed number: the key of the advisory lock that serializes migrations.
MIGRATION_LOCK = 7_020_301

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE EXTENSION IF NOT EXISTS vector;
        CREATE TABLE collections (
            id bigserial PRIMARY KEY,
            name text NOT NULL UNIQUE,
            embedding_model text NOT NULL,
            dimensions int NOT NULL CHECK (dimensions > 0),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE documents (
            collection_id bigint NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
            id text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}',
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (collection_id, id)
        );
        -- One table for every collection: each collection gets its own partial HNSW index
        -- over embedding::vector(its dimensions), so models of any size can coexist.
        CREATE TABLE chunks (
            id bigserial PRIMARY KEY,
            collection_id bigint NOT NULL,
            document_id text NOT NULL,
            ordinal int NOT NULL,
            text text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}',
            embedding vector NOT NULL,
            FOREIGN KEY (collection_id, document_id)
                REFERENCES documents (collection_id, id) ON DELETE CASCADE
        );
        CREATE INDEX chunks_document ON chunks (collection_id, document_id);
        CREATE INDEX chunks_metadata ON chunks USING gin (metadata jsonb_path_ops);
        """,
    ),
    (
        2,
        """
        -- Bumped by every change to a collection's documents, in the same transaction: cached
        -- search results are keyed by it, so a change invalidates them on every replica.
        ALTER TABLE collections ADD COLUMN version bigint NOT NULL DEFAULT 0;
        """,
    ),
    (
        3,
        """
        -- How often each search or RAG request was asked, by its normalized form (`key`):
        -- the ranking of popular queries whose answers are precomputed (serve_app/popular.py).
        CREATE TABLE query_counts (
            collection_id bigint NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
            kind text NOT NULL CHECK (kind IN ('search', 'rag')),
            key text NOT NULL,
            query text NOT NULL,
            request jsonb NOT NULL,
            count bigint NOT NULL CHECK (count > 0),
            first_seen timestamptz NOT NULL DEFAULT now(),
            last_seen timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (collection_id, kind, key)
        );
        CREATE INDEX query_counts_rank ON query_counts (last_seen, count);
        -- Answers computed ahead of time for the most asked requests, valid while their
        -- collection is at `version`.
        CREATE TABLE precomputed_answers (
            collection_id bigint NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
            kind text NOT NULL CHECK (kind IN ('search', 'rag')),
            key text NOT NULL,
            version bigint NOT NULL,
            answer jsonb NOT NULL,
            computed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (collection_id, kind, key)
        );
        -- Every ingress replica keeps the valid answers in memory and LISTENs here: a change
        -- to a collection (a new version, or its deletion) and a new answer reach all of them
        -- when the transaction commits, whoever made it.
        CREATE FUNCTION rag_notify_collection() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('rag_collections', OLD.id || ':-1');
            ELSIF NEW.version IS DISTINCT FROM OLD.version THEN
                PERFORM pg_notify('rag_collections', NEW.id || ':' || NEW.version);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER collections_changed AFTER UPDATE OR DELETE ON collections
            FOR EACH ROW EXECUTE FUNCTION rag_notify_collection();
        CREATE FUNCTION rag_notify_precomputed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            answer precomputed_answers;
        BEGIN
            IF TG_OP = 'DELETE' THEN answer := OLD; ELSE answer := NEW; END IF;
            PERFORM pg_notify(
                'rag_precomputed', answer.collection_id || ':' || answer.kind || ':' || answer.key
            );
            RETURN NULL;
        END $$;
        CREATE TRIGGER precomputed_changed AFTER INSERT OR UPDATE OR DELETE ON precomputed_answers
            FOR EACH ROW EXECUTE FUNCTION rag_notify_precomputed();
        """,
    ),
    (
        4,
        """
        -- Names a collection across databases: cached search results are keyed by it, so two
        -- databases sharing one Redis (or a database recreated with the same ids and
        -- versions) never answer from each other's entries. Each existing row gets its own.
        ALTER TABLE collections ADD COLUMN uid uuid NOT NULL DEFAULT gen_random_uuid();
        """,
    ),
    (
        5,
        """
        -- Keyword search. Each collection records its text-search configuration as it records
        -- its embedding model; every chunk carries its collection's, because a generated
        -- column may only read its own row. The tsvector is generated (STORED: PostgreSQL
        -- indexes no virtual column), so adding it fills every existing row.
        ALTER TABLE collections ADD COLUMN text_search_config regconfig NOT NULL DEFAULT 'simple';
        ALTER TABLE chunks ADD COLUMN text_search_config regconfig NOT NULL DEFAULT 'simple';
        -- Korean, Chinese and Japanese write no space between the parts a reader searches
        -- for (손해배상을 holds 손해배상 and a particle), and PostgreSQL has no parser for
        -- them: their runs of characters are also indexed as overlapping character bigrams,
        -- which a query's own bigrams match (text_search.cjk_bigrams is the same on that side).
        CREATE FUNCTION rag_cjk_bigrams(input text) RETURNS text
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
            SELECT coalesce(string_agg(substr(m.run[1], i, 2), ' ' ORDER BY m.n, i), '')
            FROM regexp_matches(input, '[\\uAC00-\\uD7A3\\u3040-\\u30FF\\u4E00-\\u9FFF]+', 'g')
                WITH ORDINALITY AS m (run, n),
                generate_series(1, greatest(length(m.run[1]) - 1, 1)) AS i
        $$;
        ALTER TABLE chunks ADD COLUMN tsv tsvector GENERATED ALWAYS AS (
            to_tsvector(text_search_config, text)
            || to_tsvector('simple'::regconfig, rag_cjk_bigrams(text))
        ) STORED;
        CREATE INDEX chunks_tsv ON chunks USING gin (tsv);
        """,
    ),
    (
        6,
        """
        -- Term statistics for keyword ranking: each collection's chunk count and, per lexeme
        -- of its chunks' tsvectors, how many chunks hold it. A query reads the counts of its
        -- few words by primary key instead of counting matching chunks.
        ALTER TABLE collections ADD COLUMN chunks bigint NOT NULL DEFAULT 0;
        UPDATE collections c
            SET chunks = (SELECT count(*) FROM chunks k WHERE k.collection_id = c.id);
        CREATE TABLE term_stats (
            collection_id bigint NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
            term text NOT NULL,
            chunks bigint NOT NULL CHECK (chunks > 0),
            PRIMARY KEY (collection_id, term)
        );
        INSERT INTO term_stats (collection_id, term, chunks)
            SELECT collection_id, lexeme, count(*) FROM chunks, unnest(tsv) GROUP BY 1, 2;
        -- Kept by the statement that changes `chunks`, in its transaction: the counts commit
        -- or roll back with the rows they count, whoever writes them (an ingest, a cascaded
        -- delete, SQL by hand). The collection's row is updated first, which locks it until
        -- commit, so the changes to one collection's counts apply one transaction at a time
        -- (no lost update, no deadlock between two writers of its terms); the app's writers
        -- hold that lock already (the version bump). A collection being deleted is skipped:
        -- its counts go with it.
        CREATE FUNCTION rag_count_terms() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('DELETE', 'UPDATE') THEN
                UPDATE collections c SET chunks = c.chunks - r.n
                    FROM (SELECT collection_id, count(*) AS n FROM removed GROUP BY 1) r
                    WHERE c.id = r.collection_id;
                MERGE INTO term_stats t
                USING (
                    SELECT r.collection_id, l.lexeme AS term, count(*) AS n
                    FROM removed r JOIN collections c ON c.id = r.collection_id,
                        unnest(r.tsv) AS l
                    GROUP BY 1, 2
                ) d ON t.collection_id = d.collection_id AND t.term = d.term
                WHEN MATCHED AND t.chunks <= d.n THEN DELETE
                WHEN MATCHED THEN UPDATE SET chunks = t.chunks - d.n;
            END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') THEN
                UPDATE collections c SET chunks = c.chunks + a.n
                    FROM (SELECT collection_id, count(*) AS n FROM added GROUP BY 1) a
                    WHERE c.id = a.collection_id;
                INSERT INTO term_stats (collection_id, term, chunks)
                    SELECT a.collection_id, l.lexeme, count(*)
                    FROM added a, unnest(a.tsv) AS l
                    GROUP BY 1, 2
                ON CONFLICT (collection_id, term)
                    DO UPDATE SET chunks = term_stats.chunks + excluded.chunks;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER chunks_terms_added AFTER INSERT ON chunks
            REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION rag_count_terms();
        CREATE TRIGGER chunks_terms_removed AFTER DELETE ON chunks
            REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION rag_count_terms();
        CREATE TRIGGER chunks_terms_changed AFTER UPDATE ON chunks
            REFERENCING OLD TABLE AS removed NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION rag_count_terms();
        """,
    ),
]


def migrate(url: str, timeout_s: float = 5.0) -> int:
    """Apply the migrations this database lacks; return the schema version now in force.

    Bounded by `timeout_s`: the connection attempt (libpq counts whole seconds, at least 2)
    and every lock wait, the other replicas' migration included. A lock held by a long
    transaction then fails this call (`psycopg.OperationalError`) instead of queueing every
    query behind a waiting ALTER TABLE; the caller tries again later.
    """
    with psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout(timeout_s)) as conn:
        conn.execute(f"SET lock_timeout = {lock_timeout_ms(timeout_s)}")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in MIGRATIONS:
                if version not in applied:
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def connect_timeout(timeout_s: float) -> int:
    """libpq's `connect_timeout` for `timeout_s`: whole seconds, and it counts less than 2 as 2."""
    return max(2, math.ceil(timeout_s))


def lock_timeout_ms(timeout_s: float) -> int:
    """`lock_timeout` in milliseconds, an integer: safe to write into SQL text."""
    return max(1, round(timeout_s * 1000))
