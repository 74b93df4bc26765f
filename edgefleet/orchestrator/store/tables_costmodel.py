"""SQLAlchemy Core tables: on-device benchmark results that calibrate the cost model."""

from __future__ import annotations

from edgefleet.orchestrator.store.tables import metadata

__all__ = ["metadata"]
