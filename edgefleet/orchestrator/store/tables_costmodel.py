"""SQLAlchemy Core tables: on-device benchmark results that calibrate the cost model."""

from __future__ import annotations

import sqlalchemy as sa

from edgefleet.orchestrator.store.tables import UtcDateTime, metadata

__all__ = ["benchmark_results", "metadata"]

# One row per variant, device and thread count of one benchmark run. A device that benchmarks a
# variant again adds new rows; the cost model weighs all of them.
benchmark_results = sa.Table(
    "benchmark_results",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("variant_id", sa.String, sa.ForeignKey("variants.variant_id", ondelete="CASCADE"), nullable=False),
    sa.Column("device_id", sa.String, sa.ForeignKey("devices.device_id", ondelete="CASCADE"), nullable=False),
    sa.Column("hardware_class", sa.String, nullable=False),
    sa.Column("runtime", sa.String, nullable=False),
    sa.Column("threads", sa.Integer, nullable=False),
    sa.Column("p50_ms", sa.Float, nullable=False),
    sa.Column("p95_ms", sa.Float, nullable=False),
    sa.Column("runs", sa.Integer, nullable=False),
    sa.Column("measured_at", UtcDateTime, nullable=False),
    sa.Index(None, "variant_id", "hardware_class"),
    sa.Index(None, "hardware_class"),
    sa.Index(None, "device_id"),
)
