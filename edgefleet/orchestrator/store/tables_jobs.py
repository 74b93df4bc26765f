"""SQLAlchemy Core tables: compression jobs."""

from __future__ import annotations

from edgefleet.orchestrator.store.tables import metadata

__all__ = ["metadata"]
