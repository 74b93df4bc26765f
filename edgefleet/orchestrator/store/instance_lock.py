"""One orchestrator per database: a lock that a starting orchestrator takes before it opens the store.

Control streams, desired-state pushes and device status live in the process that has a device's
stream open, so two orchestrators on one database would each see the other's devices as offline and would
never push to them. Start-up also marks every device that the database stores as connected disconnected,
which is right only when no other orchestrator serves that database. So the second orchestrator
refuses to start and names the one that holds the lock.

- SQLite: an exclusive flock(2) on `DATABASE.orchestrator.lock` next to the database file. The kernel
  releases it when the process ends, however it ends. The file holds the holder's host, process id and
  listen address for the error message of the next one.
- PostgreSQL: a session-level advisory lock held on a connection of its own. The server releases it
  when that session ends, so a lost connection loses the lock: `verify` notices that, takes the lock
  again on a new connection, and raises InstanceLockLost when another orchestrator took it meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from edgefleet.common.config import ConfigError
from edgefleet.orchestrator.store.engine import check_sqlite_path, database_errors, normalize_url

log = logging.getLogger(__name__)

# Key of the advisory lock that the orchestrator serving a PostgreSQL database holds. The value is
# arbitrary but must stay the same in every edgefleet release, and differ from the migration lock's.
INSTANCE_LOCK_KEY = int.from_bytes(b"efl-orch", "big")

# PostgreSQL truncates application_name to 63 bytes (NAMEDATALEN - 1).
_APPLICATION_NAME_BYTES = 63

_FIX = "run one orchestrator per database: stop the other one first, or give this one its own --db (and --data-dir)"


class InstanceLockHeld(ConfigError):
    """Another orchestrator serves this database; starting a second one would split the fleet."""


class InstanceLockLost(Exception):
    """The PostgreSQL session that held the lock ended, and another orchestrator took the lock since."""


def holder_text(listen: str) -> str:
    """Describe this process for the next orchestrator's error message: listen address, pid and host."""
    return ", ".join(_holder_parts(listen))


def application_name(listen: str) -> str:
    """Return holder_text shortened to fit PostgreSQL's application_name by dropping whole parts from the end.

    PostgreSQL would cut a longer name at 63 bytes, mid-word. The host is dropped first because the
    error message also names the client address of the holder's session.
    """
    parts = _holder_parts(listen)
    while len(parts) > 1 and len(", ".join(parts).encode()) > _APPLICATION_NAME_BYTES:
        parts.pop()
    # NOTE: a listen address longer than 37 bytes, such as a long IPv6 address, is still cut.
    return ", ".join(parts).encode()[:_APPLICATION_NAME_BYTES].decode(errors="ignore")


def _holder_parts(listen: str) -> list[str]:
    # Ordered by how much they help the operator find the other orchestrator.
    return [f"edgefleet-orchestrator at {listen}", f"pid {os.getpid()}", f"host {socket.gethostname()}"]


class InstanceLock:
    """The lock of one database; acquire with acquire_instance_lock, release with release()."""

    def verify(self) -> bool:
        """Check that the lock is still held; return True when it had to be taken again.

        Raises InstanceLockLost when another orchestrator holds it now, and DatabaseUnavailable when
        the database cannot be reached (the caller retries on its next check).
        """
        return False

    def release(self) -> None:
        """Give the lock up. Calling it twice is harmless."""


class SqliteInstanceLock(InstanceLock):
    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            # Closing the file drops the flock; the file stays, as a later start would create it again.
            self._handle.close()
            self._handle = None


class PostgresInstanceLock(InstanceLock):
    def __init__(self, engine: Engine, connection: Connection, shown_url: str) -> None:
        self._engine = engine
        self._connection: Connection | None = connection
        self._shown_url = shown_url

    def verify(self) -> bool:
        if self._connection is not None:
            try:
                self._connection.execute(sa.text("SELECT 1"))
                return False
            except sa.exc.DBAPIError:
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = None
        # The session ended (the server restarted, or someone terminated the backend): the server
        # released the lock with it. Take it again unless another orchestrator took it meanwhile.
        with database_errors(self._engine):
            connection = self._engine.connect()
            try:
                holder = _try_advisory_lock(connection)
            except BaseException:
                connection.close()
                raise
        if holder is not None:
            connection.close()
            raise InstanceLockLost(
                f"the database {self._shown_url} lost this orchestrator's session, and {holder} "
                f"took over the database since; this orchestrator stops so that one serves the fleet. {_FIX}"
            )
        self._connection = connection
        log.warning("lost the PostgreSQL session of the orchestrator lock; acquired the lock again on a new session")
        return True

    def release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None
        self._engine.dispose()


def acquire_instance_lock(db_url: str, listen: str) -> InstanceLock:
    """Take the lock of db_url's database for this process, which listens on listen.

    Raises InstanceLockHeld naming the holder when another orchestrator has it, ConfigError for a bad
    URL, and the driver's OperationalError when PostgreSQL cannot be reached.
    """
    url = normalize_url(db_url)
    if url.get_backend_name() == "sqlite":
        return _acquire_sqlite(Path(url.database or ""), listen)
    return _acquire_postgres(url, listen)


def sqlite_lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".orchestrator.lock")


def _acquire_sqlite(database: Path, listen: str) -> SqliteInstanceLock:
    # The database's own checks name the problem with its directory or file better than the lock could.
    check_sqlite_path(database)
    # The lock sits next to the file that the path resolves to, so a symlink or a relative path to the
    # same database finds the same lock. NOTE: a hard link to the database still gets a lock of its own.
    database = database.resolve()
    path = sqlite_lock_path(database)
    try:
        # "a+" creates the file without truncating what the holder wrote.
        handle = path.open("a+", encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(
            f"the orchestrator lock {path} is a directory, not a file; remove it (no orchestrator uses it) "
            "and start again"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"cannot open the orchestrator lock {path}: {error.strerror}; the directory of the SQLite database "
            "must be writable by this user, so point --db or --data-dir at one that is"
        ) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _read_holder(handle.read())
        handle.close()
        raise InstanceLockHeld(
            f"another orchestrator already serves the database {database} ({holder}, lock file {path}); {_FIX}"
        ) from None
    except OSError as error:
        handle.close()
        raise ConfigError(
            f"cannot lock {path}: {error.strerror}; the SQLite database must be on a local file system that "
            "supports flock, so point --db or --data-dir at one"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    handle.write(json.dumps({"holder": holder_text(listen), "since": started}) + "\n")
    handle.flush()
    return SqliteInstanceLock(path, handle)


def _read_holder(text: str) -> str:
    try:
        record: Any = json.loads(text)
        return f"{record['holder']}, since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _acquire_postgres(url: URL, listen: str) -> PostgresInstanceLock:
    # NullPool: this engine's one connection is the lock's session, never shared with the store's pool.
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"application_name": application_name(listen)})
    shown_url = url.render_as_string(hide_password=True)
    try:
        connection = engine.connect()
        holder = _try_advisory_lock(connection)
    except BaseException:
        engine.dispose()
        raise
    if holder is not None:
        connection.close()
        engine.dispose()
        raise InstanceLockHeld(f"another orchestrator already serves the database {shown_url} ({holder}); {_FIX}")
    return PostgresInstanceLock(engine, connection, shown_url)


def _try_advisory_lock(connection: Connection) -> str | None:
    """Take the lock in connection's session; return None when taken, else who holds it.

    The connection runs in autocommit, so the lock outlives any transaction (pg_try_advisory_lock
    takes a session lock either way, but an open transaction would keep a snapshot alive).
    """
    connection = connection.execution_options(isolation_level="AUTOCOMMIT")
    if connection.execute(sa.select(sa.func.pg_try_advisory_lock(INSTANCE_LOCK_KEY))).scalar_one():
        return None
    # A bigint key shows in pg_locks as classid (high 32 bits), objid (low 32 bits) and objsubid 1.
    row = connection.execute(
        sa.text(
            "SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = :high AND l.objid = :low"
        ),
        {"high": INSTANCE_LOCK_KEY >> 32, "low": INSTANCE_LOCK_KEY & 0xFFFFFFFF},
    ).first()
    if row is None:
        return "a session that ended just now; start again"
    pid, application_name, client, since = row
    parts = [application_name or "a session without application_name", f"PostgreSQL backend pid {pid}"]
    if client:
        parts.append(f"from {client}")
    if since is not None:
        parts.append(f"since {since.astimezone(UTC).isoformat(timespec='seconds')}")
    return ", ".join(parts)
