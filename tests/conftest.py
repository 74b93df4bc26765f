"""Shared fixtures: a throwaway PostgreSQL cluster, database URLs and stores on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# pytest puts this directory on sys.path because tests/ is not a package.
from pg import PostgresCluster, find_postgres_bin

if TYPE_CHECKING:
    from edgefleet.orchestrator.store import Store

# The PostgreSQL database behind db_url, migrated to head once per session.
_TEST_DATABASE = "edgefleet_tests"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the PostgreSQL cluster, so -m "not postgres" deselects it."""
    for item in items:
        if "postgres_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Start a PostgreSQL cluster for the test session and delete it afterwards.

    Skips when no PostgreSQL server binaries are installed, unless EDGEFLEET_REQUIRE_POSTGRES=1,
    which turns the skip into a failure.
    """
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; install postgresql"
        if os.environ.get("EDGEFLEET_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message} (EDGEFLEET_REQUIRE_POSTGRES=1 forbids skipping)")
        pytest.skip(message)

    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """Return the URL of an empty database "edgefleet" in the session cluster."""
    return postgres_cluster.create_database("edgefleet")


@pytest.fixture(scope="session")
def _postgres_test_database(postgres_cluster: PostgresCluster) -> str:
    from edgefleet.orchestrator.store import open_store

    open_store(postgres_cluster.create_database(_TEST_DATABASE)).close()
    return _TEST_DATABASE


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgefleet.orchestrator.store import open_store

    path = tmp_path_factory.mktemp("sqlite-template") / "edgefleet.db"
    # Closing the last connection checkpoints the WAL into the main file, so the file alone is complete.
    open_store(f"sqlite:///{path}").close()
    return path


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the URL of an empty database migrated to head: a SQLite file, or a PostgreSQL database.

    The PostgreSQL half carries the postgres mark, so -m "not postgres" deselects it. Each SQLite
    test gets a copy of a file migrated once. All PostgreSQL tests share one database whose tables
    are emptied before each test, because copying a template database took about a second and
    truncating took tens of milliseconds. A test must therefore close its stores and must not change
    the schema.
    """
    if request.param == "sqlite":
        path = tmp_path / "edgefleet.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"

    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    database: str = request.getfixturevalue("_postgres_test_database")
    cluster.truncate_tables(database)
    return cluster.url(database)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """Yield a store opened on db_url, on SQLite and on PostgreSQL, and close it afterwards."""
    from edgefleet.orchestrator.store import open_store

    opened = open_store(db_url)
    yield opened
    opened.close()
