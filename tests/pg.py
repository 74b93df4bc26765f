"""A throwaway PostgreSQL cluster for tests, run from the server binaries installed on this machine."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

POSTGRES_ROOT = Path("/usr/lib/postgresql")

# The server runs in a zone with a non-whole-hour offset, so tests notice timestamps that are read
# back in the session time zone instead of UTC.
SERVER_TIME_ZONE = "Asia/Kolkata"


def find_postgres_bin(root: Path = POSTGRES_ROOT) -> Path | None:
    """Return the bin directory of the newest PostgreSQL under root, or None when none is installed."""
    if not root.is_dir():
        return None
    candidates = []
    for entry in root.iterdir():
        if re.fullmatch(r"\d+(\.\d+)?", entry.name) and (entry / "bin" / "initdb").is_file():
            candidates.append((tuple(int(part) for part in entry.name.split(".")), entry / "bin"))
    if not candidates:
        return None
    return max(candidates)[1]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only, with trust auth.

    Running as root, the server runs as the postgres user because PostgreSQL refuses to run as root.
    fsync is off: the data is thrown away at stop().
    """

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = 0
        self.superuser = "postgres"
        self._run_as: str | None = "postgres" if os.geteuid() == 0 else None
        self._base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data_dir = self._base / "data"
        self.socket_dir = self._base / "socket"
        self.log_file = self._base / "server.log"
        self._started = False

    def _command(self, *args: str) -> list[str]:
        if self._run_as is None:
            return list(args)
        return ["runuser", "-u", self._run_as, "--", *args]

    def _run(self, *args: str) -> None:
        result = subprocess.run(self._command(*args), capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}\nserver log:\n{self._server_log()}"
            )

    def _server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    def start(self) -> None:
        """Run initdb and start the server on a free port; raise RuntimeError when either fails."""
        self.socket_dir.mkdir()
        if self._run_as is not None:
            try:
                user = pwd.getpwnam(self._run_as)
            except KeyError:
                raise RuntimeError(
                    f"PostgreSQL refuses to run as root and there is no {self._run_as!r} user to run it as; "
                    f"create one with: useradd --system {self._run_as}"
                ) from None
            for path in (self._base, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._base.chmod(0o700)

        self._run(
            str(self.bin_dir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            self.superuser,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",
        )
        # Another process may take the port between free_port() and the server's bind; retry then.
        for attempt in range(3):
            self.port = free_port()
            options = " ".join(
                [
                    f"-p {self.port}",
                    "-c listen_addresses=127.0.0.1",
                    f"-c unix_socket_directories={self.socket_dir}",
                    f"-c timezone={SERVER_TIME_ZONE}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "--pgdata",
                    str(self.data_dir),
                    "--log",
                    str(self.log_file),
                    "--options",
                    options,
                    "--wait",
                    "--timeout",
                    "60",
                )
            except RuntimeError:
                if attempt == 2:
                    raise
                logger.warning("PostgreSQL did not start on port %d; retrying on another port", self.port)
                continue
            self._started = True
            logger.info("started PostgreSQL from %s on 127.0.0.1:%d", self.bin_dir, self.port)
            return

    def url(self, database: str) -> str:
        """Return the SQLAlchemy URL of a database in this cluster."""
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.superuser, dbname="postgres", autocommit=True
        )

    def create_database(self, name: str, template: str = "template0") -> str:
        """Create a database, copied from template, and return its URL."""
        with self._admin() as connection:
            connection.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            )
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still connected to it."""
        with self._admin() as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def truncate_tables(self, database: str, keep: tuple[str, ...] = ("alembic_version",)) -> None:
        """Empty every table in the public schema of database except keep, and reset its sequences."""
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.superuser, dbname=database, autocommit=True
        ) as connection:
            names = [
                name
                for (name,) in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                if name not in keep
            ]
            if names:
                tables = sql.SQL(", ").join(sql.Identifier(name) for name in names)
                connection.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(tables))

    def stop(self) -> None:
        """Stop the server and delete its directory; safe to call after a failed start."""
        try:
            if self._started:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    "--pgdata",
                    str(self.data_dir),
                    "--mode",
                    "immediate",
                )
                self._started = False
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self._base)
