"""Engine set-up for SQLite and PostgreSQL, and the Alembic upgrade that runs when a store opens."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine, make_url

from edgefleet import __version__
from edgefleet.common.config import ConfigError
from edgefleet.common.errors import DATABASE_UNAVAILABLE_TEXT, Unavailable
from edgefleet.common.paths import writable_directory_problem

logger = logging.getLogger(__name__)

# How long a SQLite connection waits for another writer before it fails with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0

# Connection execution option that marks a transaction as read-only, so SQLite begins it deferred.
READ_ONLY_OPTION = "edgefleet_read_only"

# Every SQLite database file starts with these 16 bytes ("The Database Header", sqlite.org/fileformat.html).
SQLITE_HEADER = b"SQLite format 3\x00"

# Primary SQLite result codes (sqlite.org/rescode.html) of errors that a restart cannot fix: the file
# is not a database, cannot be opened, is read-only or corrupt, or access to it is denied.
_SQLITE_CONFIG_ERRORS = frozenset(
    {
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_PERM,
    }
)

# The fix that every SQLite configuration error names.
_SQLITE_FIX = "point --db or --data-dir elsewhere"

# Extended SQLite result codes (sqlite.org/rescode.html) of a failed write, file growth or shared-memory
# set-up. A full disk causes them too: "disk I/O error" when a new connection cannot size the -shm file.
_SQLITE_WRITE_IOERRS = frozenset(
    {
        sqlite3.SQLITE_IOERR_WRITE,
        sqlite3.SQLITE_IOERR_FSYNC,
        sqlite3.SQLITE_IOERR_TRUNCATE,
        sqlite3.SQLITE_IOERR_SHMOPEN,
        sqlite3.SQLITE_IOERR_SHMSIZE,
        sqlite3.SQLITE_IOERR_SHMMAP,
    }
)

# Free space below which one of those I/O errors counts as a full disk. SQLite grows its files by a
# page (4 KiB by default) and the -shm file by 32 KiB.
# NOTE: a guessed margin; a write larger than it can still fail with more space free.
DISK_FULL_BYTES = 1024 * 1024

# Key of the PostgreSQL advisory lock that serializes schema upgrades of concurrently starting
# orchestrators. The value is arbitrary but must stay the same in every edgefleet release.
_MIGRATION_LOCK_KEY = int.from_bytes(b"edgeflt", "big")


# SQLSTATE classes of PostgreSQL errors that mean the server is unreachable or went away: 08
# "Connection Exception" and 57P "Operator Intervention" (shutdown, crash, not accepting connections yet),
# from Appendix A "PostgreSQL Error Codes" of the PostgreSQL 15 manual.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P")


class DatabaseUnavailable(Unavailable):
    """The store's PostgreSQL server cannot be reached or dropped the connection, or the disk of its SQLite
    file is full; a retry may succeed."""


class DatabaseDiskFull(DatabaseUnavailable):
    """The file system of the SQLite database is full, so writes fail until space is freed on it."""


class MigrationError(Exception):
    """A schema migration left the database inconsistent and was rolled back."""


class UnknownRevisionError(ConfigError):
    """The database is at an Alembic revision that this release does not ship, so a newer release migrated it."""


def unavailable_error(engine: Engine, error: sa.exc.DBAPIError) -> DatabaseUnavailable | None:
    """Return a DatabaseUnavailable for an error that a lost PostgreSQL server or a full SQLite disk caused, else None.

    psycopg raises its OperationalError without a SQLSTATE when it cannot connect at all. Other SQLite
    errors are left alone, because its OperationalError also covers errors that a retry cannot fix.
    """
    if engine.dialect.name == "sqlite":
        return sqlite_disk_full(engine, error)
    if engine.dialect.name != "postgresql":
        return None
    cause = _lost_server_error(engine, error.orig)
    if cause is None and not error.connection_invalidated:
        return None
    if cause is None:
        cause = error.orig
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return DatabaseUnavailable(
        f"{DATABASE_UNAVAILABLE_TEXT} ({reason}); the orchestrator reconnects by itself, so retry in a few seconds"
    )


def sqlite_disk_full(engine: Engine, error: sa.exc.DBAPIError) -> DatabaseDiskFull | None:
    """Return a DatabaseDiskFull naming the file and the fix when a full disk caused a SQLite error, else None.

    SQLITE_FULL always counts. The I/O errors in _SQLITE_WRITE_IOERRS count when the file system of
    the database has less than DISK_FULL_BYTES free, because a failing disk causes them as well.
    """
    if engine.dialect.name != "sqlite" or not isinstance(error.orig, sqlite3.Error):
        return None
    code = getattr(error.orig, "sqlite_errorcode", -1)
    database = Path(engine.url.database or "")
    try:
        usage = os.statvfs(database.parent)
    except OSError:
        usage = None
    free = usage.f_bavail * usage.f_frsize if usage is not None else None
    disk_is_full = free is not None and free < DISK_FULL_BYTES
    if code & 0xFF != sqlite3.SQLITE_FULL and not (code in _SQLITE_WRITE_IOERRS and disk_is_full):
        return None
    free_text = f", {free} bytes free" if free is not None else ""
    return DatabaseDiskFull(
        f"{DATABASE_UNAVAILABLE_TEXT}: the file system of the SQLite database {database} is full "
        f"({error.orig}{free_text}); free space on that file system or move the database with --db or --data-dir"
    )


def _lost_server_error(engine: Engine, orig: BaseException | None) -> BaseException | None:
    """Return the driver's error in orig's chain that reports a lost server, else None.

    The chain matters when the pool's pre-ping finds a dead connection: psycopg then also fails to
    restore autocommit on it, and SQLAlchemy raises that ProgrammingError, whose context is the
    OperationalError of the ping.
    """
    operational_error = engine.dialect.loaded_dbapi.OperationalError
    seen: set[int] = set()
    while orig is not None and id(orig) not in seen:
        seen.add(id(orig))
        if isinstance(orig, operational_error):
            sqlstate = getattr(orig, "sqlstate", None)
            if sqlstate is None or sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
                return orig
        orig = orig.__cause__ or orig.__context__
    return None


@contextlib.contextmanager
def database_errors(engine: Engine) -> Iterator[None]:
    """Raise DatabaseUnavailable in place of the driver's error when the PostgreSQL server is lost or the
    SQLite disk is full."""
    try:
        yield
    except sa.exc.DBAPIError as error:
        unavailable = unavailable_error(engine, error)
        if unavailable is None:
            raise
        raise unavailable from error


def normalize_url(url: str) -> URL:
    """Parse a database URL and select psycopg 3 for PostgreSQL.

    Accepts sqlite:///PATH and postgresql[+psycopg]://... Raises ConfigError (a ValueError) for other
    backends or drivers, and for an in-memory SQLite database, which every pooled connection would see empty.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(
            f"invalid database URL {url!r} ({exc}); use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from exc
    except ValueError as exc:
        # make_url converts the port with int(); the message must not show a password.
        from edgefleet.orchestrator.server import redact_url

        raise ConfigError(
            f"invalid database URL {redact_url(url)!r}: the port is not a number from 1 to 65535; PostgreSQL "
            "listens on 5432 unless its port setting says otherwise"
        ) from exc

    # get_driver_name() imports the dialect, which fails with NoSuchModuleError for an unknown backend,
    # so the backend is checked first.
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database backend {backend!r} in {parsed.render_as_string()!r}; "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    driver = parsed.get_driver_name()
    if backend == "sqlite":
        if driver != "pysqlite":
            raise ConfigError(f"unsupported SQLite driver {driver!r} in {url!r}; use sqlite:///PATH")
        if parsed.database in (None, "", ":memory:") or (parsed.database or "").startswith("file::memory:"):
            raise ConfigError(f"in-memory SQLite database {url!r} is not supported; use sqlite:///PATH")
        return parsed
    if parsed.drivername != "postgresql" and driver != "psycopg":
        raise ConfigError(
            f"unsupported PostgreSQL driver {driver!r} in {parsed.render_as_string()!r}; use postgresql+psycopg://"
        )
    _check_postgresql_url(parsed)
    return parsed.set(drivername="postgresql+psycopg")


def _check_postgresql_url(parsed: URL) -> None:
    """Raise ConfigError for a PostgreSQL URL without a database name or with an invalid port.

    Without a name libpq connects to the database named like the user, usually the "postgres"
    maintenance database, and the orchestrator would create its tables there.
    """
    shown = parsed.render_as_string()
    if not parsed.database and "dbname" not in parsed.query:
        raise ConfigError(
            f"invalid database URL {shown!r}: it names no database; add it after the host, as in "
            "postgresql+psycopg://USER@HOST:PORT/edgefleet"
        )
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(
            f"invalid database URL {shown!r}: the port is not a number from 1 to 65535; PostgreSQL listens on "
            "5432 unless its port setting says otherwise"
        )


def create_store_engine(url: str | URL) -> Engine:
    """Create an engine with the connection settings the store relies on.

    Raises ConfigError (a ValueError) for a bad URL, and for a SQLite path whose directory cannot be
    created or written or whose file is not a SQLite database.
    """
    parsed = normalize_url(url if isinstance(url, str) else url.render_as_string(hide_password=False))
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(parsed)
    return sa.create_engine(parsed, pool_pre_ping=True)


def _create_sqlite_engine(url: URL) -> Engine:
    database = Path(url.database or "")
    check_sqlite_path(database)
    _create_private_file(database)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    # pysqlite opens transactions itself with a deferred BEGIN. Two deferred transactions that both
    # read and then write deadlock on the lock upgrade, and SQLite fails one at once with "database
    # is locked" regardless of the busy timeout. So pysqlite's transaction handling is switched off
    # and every transaction begins here instead: writers with BEGIN IMMEDIATE, which takes the write
    # lock up front and waits up to the busy timeout for it. This is the recipe in the SQLAlchemy
    # SQLite dialect documentation, "Serializable isolation / Savepoints / Transactional DDL".
    @sa.event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: sqlite3.Connection, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # A new database gets incremental auto-vacuum, so retention can return space without a full
            # VACUUM that blocks writers. The pragma changes nothing in a database that has tables.
            cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
            # WAL lets readers run while one writer commits.
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL cannot corrupt the database; a power loss may undo the last commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _create_private_file(database: Path) -> None:
    """Create a missing SQLite database file with mode 0600, whatever the umask.

    The database contains the private signing keys. SQLite would create the file with mode 0644 under
    the usual umask 022, and it gives DATABASE-wal and DATABASE-shm the mode of the database file.
    An existing file keeps its mode.
    """
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    logger.info("created the SQLite database file %s with mode 0600", database)


def check_sqlite_path(database: Path) -> None:
    """Create the directory of a SQLite database file and check that SQLite can use the file.

    Raises ConfigError naming the path and the fix when the directory cannot be created or is not
    writable, or when the file is a directory, unreadable or not a SQLite database. The directory must
    be writable because WAL mode writes DATABASE-wal and DATABASE-shm next to the file. An empty file
    is a new database to SQLite.
    """
    directory = database.parent
    problem = writable_directory_problem(directory)
    if problem is not None:
        raise ConfigError(
            f"the directory {directory} of the SQLite database {database} {problem}; SQLite creates its journal "
            f"files there, so make it writable or {_SQLITE_FIX}"
        )
    if database.is_dir():
        raise ConfigError(f"the SQLite database {database} is a directory, not a file; {_SQLITE_FIX}")
    try:
        with database.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except PermissionError as error:
        raise ConfigError(
            f"cannot read the SQLite database {database} ({error.strerror}); make it readable by this user (uid "
            f"{os.getuid()}) or {_SQLITE_FIX}"
        ) from None
    if header and header != SQLITE_HEADER:
        raise ConfigError(f"{database} is not a SQLite database; {_SQLITE_FIX} or restore the file from a backup")
    if not os.access(database, os.R_OK | os.W_OK):
        raise ConfigError(
            f"the SQLite database {database} is not writable by this user (uid {os.getuid()}); make it writable "
            f"or {_SQLITE_FIX}"
        )


def sqlite_config_error(engine: Engine, error: sa.exc.DBAPIError) -> ConfigError | None:
    """Return a ConfigError naming the file and the fix when error is a SQLite error that a restart cannot fix.

    Returns None for other errors and other databases, such as "database is locked" or an unreachable
    PostgreSQL server, which may pass.
    """
    if engine.dialect.name != "sqlite" or not isinstance(error.orig, sqlite3.Error):
        return None
    # sqlite_errorcode is the extended result code, and its low byte is the primary code.
    if getattr(error.orig, "sqlite_errorcode", -1) & 0xFF not in _SQLITE_CONFIG_ERRORS:
        return None
    return ConfigError(
        f"cannot use the SQLite database {engine.url.database}: {error.orig}; check its permissions, "
        f"{_SQLITE_FIX} or restore the file from a backup"
    )


def alembic_config() -> Config:
    """Return an Alembic configuration that points at the migrations shipped in this package."""
    migrations = resources.files("edgefleet.orchestrator.store") / "migrations"
    # The file sets script_location to its own directory.
    return Config(str(migrations / "alembic.ini"))


@contextlib.contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """Open the transaction that Alembic migrations run in, with SQLite's foreign keys off.

    On SQLite, batch mode changes a table by copying it, dropping the original and renaming the copy.
    With foreign keys on, dropping the original fires ON DELETE CASCADE and deletes every row that
    references it. SQLite ignores PRAGMA foreign_keys inside a transaction, so it is switched off on
    the DBAPI connection before the transaction begins and on again after it ends. Before commit,
    PRAGMA foreign_key_check must report no violations, else MigrationError is raised and the
    transaction rolls back.
    """
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            yield connection
        return

    with engine.connect() as connection:
        # The DBAPI connection runs in autocommit (isolation_level None), so the pragma runs outside
        # any transaction, where SQLite applies it.
        dbapi_connection = connection.connection.driver_connection
        assert isinstance(dbapi_connection, sqlite3.Connection)
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                yield connection
                _check_foreign_keys(connection)
        finally:
            try:
                dbapi_connection.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error:
                # The pool must not hand out a connection without foreign keys, and a new one gets
                # them on connect.
                connection.invalidate()


# How many violations a MigrationError lists.
_SHOWN_VIOLATIONS = 5


def _check_foreign_keys(connection: Connection) -> None:
    """Raise MigrationError listing the rows that PRAGMA foreign_key_check reports, if any."""
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if not violations:
        return
    # Each row is (table, rowid, referenced table, index of the foreign key in the table).
    shown = "; ".join(
        f"{table} row {rowid} references {parent} (foreign key {fkid})"
        for table, rowid, parent, fkid in violations[:_SHOWN_VIOLATIONS]
    )
    more = f" and {len(violations) - _SHOWN_VIOLATIONS} more" if len(violations) > _SHOWN_VIOLATIONS else ""
    rows = "1 row" if len(violations) == 1 else f"{len(violations)} rows"
    raise MigrationError(
        f"the schema migration left {rows} whose referenced row is missing: {shown}{more}; "
        "the migration was rolled back, so the database is unchanged"
    )


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending Alembic revision in one transaction and log the upgrade at INFO.

    Raises UnknownRevisionError (a ConfigError) when a newer release migrated the database. Raises
    ConfigError naming the file when a SQLite database is not a database, cannot be opened, is
    read-only or corrupt, and DatabaseDiskFull when its disk is full. Raises MigrationError when a
    migration left rows without their referenced row, and the driver's error for other failures.
    """
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    shown_url = engine.url.render_as_string(hide_password=True)
    try:
        with migration_transaction(engine) as connection:
            if connection.dialect.name == "postgresql":
                # Released at commit. SQLite needs no lock because BEGIN IMMEDIATE already serializes.
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            previous = MigrationContext.configure(connection).get_current_revision()
            _check_known_revision(script, previous, shown_url)
            if previous != head:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
    except sa.exc.DBAPIError as error:
        config_error = sqlite_config_error(engine, error)
        if config_error is not None:
            raise config_error from error
        disk_full = sqlite_disk_full(engine, error)
        if disk_full is not None:
            raise disk_full from error
        raise
    if previous == head:
        logger.debug("database schema of %s is at head %s", shown_url, head)
    elif previous is None:
        logger.info("created the database schema of %s at %s", shown_url, head)
    else:
        logger.info("upgraded the database schema of %s from %s to %s", shown_url, previous, head)


def _check_known_revision(script: ScriptDirectory, revision: str | None, shown_url: str) -> None:
    """Raise UnknownRevisionError when revision is not one of the migrations this release ships."""
    if revision is None or revision in {known.revision for known in script.walk_revisions()}:
        return
    raise UnknownRevisionError(
        f"the database {shown_url} is at schema revision {revision}, which edgefleet {__version__} does not "
        f"know (its newest is {script.get_current_head()}) because a newer release migrated it. Start that "
        "release, or restore the backup taken before the upgrade and start this one"
    )


# One writer lock per SQLite engine, shared by every store built on it.
_WRITER_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_WRITER_LOCKS_GUARD = threading.Lock()

# The latest write of each SQLite engine that failed on a full disk, with its time.monotonic().
_FULL_DISK_WRITES: weakref.WeakKeyDictionary[Engine, tuple[DatabaseDiskFull, float]] = weakref.WeakKeyDictionary()
# How long ping() raises after a write failed on a full disk. It is longer than the 5 s interval of the
# orchestrator's health check, so that the next check reports each failure. The rollout engine writes
# its lease every second, so a full disk keeps failing writes while it lasts.
FULL_DISK_REPORT_S = 10.0


def _writer_lock(engine: Engine) -> threading.Lock | contextlib.nullcontext[None]:
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(engine, threading.Lock())


class SqlTransactions:
    """Read and write transactions on a store engine, for the SQL store classes to inherit.

    SQLite admits one writer at a time, and a waiting connection polls, sleeping up to 100 ms
    between tries (sqliteDefaultBusyCallback in SQLite's main.c). So every store on one engine
    queues this process's writers on one shared lock instead; writers of other processes still
    wait through BEGIN IMMEDIATE, which the engine's begin hook issues. Both transaction kinds raise
    DatabaseUnavailable when the PostgreSQL server cannot be reached or drops the connection, and
    DatabaseDiskFull when the disk of the SQLite file is full.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._write_lock = _writer_lock(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    def ping(self) -> None:
        """Run a trivial query; raise DatabaseUnavailable when the PostgreSQL server cannot be reached.

        Reads keep working on a full disk, so it raises DatabaseDiskFull for FULL_DISK_REPORT_S after
        a write of this engine failed on one. A trial write would not do: a small one can succeed in
        the space that failed writes left in the WAL file while larger ones still fail.
        """
        with self._read() as connection:
            connection.execute(sa.text("SELECT 1"))
        failure = _FULL_DISK_WRITES.get(self._engine)
        if failure is not None and time.monotonic() - failure[1] < FULL_DISK_REPORT_S:
            raise failure[0]

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with database_errors(self._engine), self._write_lock, self._engine.begin() as connection:
                yield connection
        except DatabaseDiskFull as error:
            _FULL_DISK_WRITES[self._engine] = (error, time.monotonic())
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with database_errors(self._engine), self._engine.connect() as connection:
            connection.execution_options(**{READ_ONLY_OPTION: True})
            with connection.begin():
                yield connection
