"""A throwaway PostgreSQL server for tests: initdb into a temp folder, started on a free loopback port, removed after.

Uses the Debian `postgresql` package's binaries (the Makefile installs them). Missing binaries fail the test run
loudly: the ledger's PostgreSQL path is never skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testkit.ports import free_port


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL binaries not found: `make test` installs Debian's postgresql package")
    return Path(found[-1]).parent


def _as_postgres(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; the Debian package creates the `postgres` user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresServer:
    """A throwaway server that a fault test may stop and start again (same data, same port)."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self._bindir, self._root, self._port = bindir, root, port

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        data, log = self._root / "pgdata", self._root / "pg.log"
        options = f"-p {self._port} -k {self._root / 'pgsock'} -c listen_addresses=127.0.0.1 -c fsync=off"
        command = [str(self._bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), *args]
        subprocess.run(_as_postgres(command), check=check, capture_output=True, timeout=120)

    def start(self) -> None:
        self._pg_ctl("-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash."""
        self._pg_ctl("-m", mode, "-w", "stop")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh, started server; stopped and its files deleted afterwards."""
    bindir = postgres_bin()
    # Directly under /tmp: pytest's own temp folders are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="anker-pg-"))
    sockets = root / "pgsock"
    sockets.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    server = PostgresServer(bindir, root, free_port())
    subprocess.run(
        _as_postgres(
            [str(bindir / "initdb"), "-D", str(root / "pgdata"), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    server.start()
    try:
        yield server
    finally:
        server._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Yields a SQLAlchemy URL of a fresh server; stops it and deletes its files afterwards."""
    with postgres_server() as server:
        yield server.url
