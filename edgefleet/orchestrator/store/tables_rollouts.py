"""SQLAlchemy Core tables: rollouts, their waves and per-device outcomes."""

from __future__ import annotations

from edgefleet.orchestrator.store.tables import metadata

__all__ = ["metadata"]
