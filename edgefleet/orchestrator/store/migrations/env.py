"""Alembic environment: migrates the connection open_store() passes in, or the URL given with -x url=."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from edgefleet.orchestrator.store.engine import create_store_engine, migration_transaction
from edgefleet.orchestrator.store.schema import metadata


def _run(connection: Connection) -> None:
    if connection.dialect.name == "sqlite" and connection.exec_driver_sql("PRAGMA foreign_keys").scalar():
        # A batch-mode step would drop a table and cascade the delete to every row that references it.
        raise RuntimeError(
            "the SQLite connection enforces foreign keys, so a table rebuild would delete the rows that "
            "reference the table; migrate in edgefleet.orchestrator.store.engine.migration_transaction()"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        # SQLite cannot alter most column properties; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return

    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database given; pass -x url=sqlite:///PATH or -x url=postgresql+psycopg://...")
    engine = create_store_engine(url)
    try:
        with migration_transaction(engine) as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database with -x url=...")
_run_online()
