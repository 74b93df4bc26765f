"""Durable fleet state: the Store interface, its SQL implementation and the open_store() factory."""

from __future__ import annotations

from edgefleet.orchestrator.store.base import (
    AlreadyExistsError,
    IdentityMismatchError,
    NotFoundError,
    Store,
    StoreError,
)

__all__ = [
    "AlreadyExistsError",
    "IdentityMismatchError",
    "NotFoundError",
    "Store",
    "StoreError",
    "open_store",
]


def open_store(url: str) -> Store:
    """Open the SQL store at url and migrate its schema to the newest revision.

    url is sqlite:///PATH (the parent directory is created) or postgresql+psycopg://USER@HOST/DB;
    postgresql:// selects psycopg 3 as well. Raises ValueError for another backend, driver or an
    in-memory SQLite URL, and the driver's OperationalError when the database cannot be reached.
    """
    # Imported here so that importing the interface does not load SQLAlchemy and Alembic.
    from edgefleet.orchestrator.store.engine import create_store_engine, upgrade_to_head
    from edgefleet.orchestrator.store.sql import SqlStore

    engine = create_store_engine(url)
    try:
        upgrade_to_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine)
