"""Where this process runs in the Ray cluster, for names an operator can trace.

Connections to PostgreSQL (`application_name`) and Redis (`CLIENT SETNAME`) are named
`rag-serve:<role>@<node>`, so `pg_stat_activity` and `CLIENT LIST` show which deployment on
which node holds each one.
"""

from __future__ import annotations

import ray

NODE_ID_CHARS = 12  # PostgreSQL keeps 63 bytes of an application_name


def node_id() -> str:
    """The first characters of this process's Ray node id ("local" outside Ray)."""
    if not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_node_id()[:NODE_ID_CHARS]


def client_name(role: str) -> str:
    return f"rag-serve:{role}@{node_id()}"
