"""Every table of the SQL store in one MetaData, for Alembic and for the schema checks."""

from __future__ import annotations

# Importing the modules registers their tables on the shared MetaData.
from edgefleet.orchestrator.store import (  # noqa: F401
    tables_costmodel,
    tables_jobs,
    tables_rollouts,
    tables_security,
)
from edgefleet.orchestrator.store.tables import metadata

__all__ = ["metadata"]
