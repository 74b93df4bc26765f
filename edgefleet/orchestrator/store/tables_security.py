"""SQLAlchemy Core tables: enrollment tokens, operator API tokens and signing keys."""

from __future__ import annotations

from edgefleet.orchestrator.store.tables import metadata

__all__ = ["metadata"]
