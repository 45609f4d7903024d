"""The document store: PostgreSQL with pgvector, embedded by default or external by URL."""

from __future__ import annotations

from serve_app.cluster import client_name
from serve_app.config import StoreConfig
from serve_app.store.embedded import embedded_url
from serve_app.store.vector_store import HnswParams, VectorStore


async def open_store(config: StoreConfig, role: str = "store") -> VectorStore:
    """The configured store: `database_url` when set, else the embedded server in `data_dir`.
    `role` names the connections (`rag-serve:<role>@<node>`)."""
    url = config.database_url or embedded_url(config.data_dir, config.shared_buffers)
    hnsw = HnswParams(m=config.hnsw_m, ef_construction=config.hnsw_ef_construction)
    return await VectorStore.open(
        url,
        pool_size=config.pool_size,
        hnsw=hnsw,
        timeout_s=config.timeout_s,
        name=client_name(role),
    )
