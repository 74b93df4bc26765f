"""SQLAlchemy Core tables: compression jobs."""

from __future__ import annotations

import sqlalchemy as sa

from edgefleet.orchestrator.store.tables import UtcDateTime, metadata

__all__ = ["compression_jobs", "metadata"]

# One row per compression job. The worker process that runs a job writes progress to its row, fenced by
# `attempt`: a write names the attempt it belongs to, so a worker of an older attempt (one that was
# cancelled or requeued) changes nothing.
compression_jobs = sa.Table(
    "compression_jobs",
    metadata,
    sa.Column("job_id", sa.String, primary_key=True),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("source_variant_id", sa.String, nullable=False),
    sa.Column("source_digest", sa.String, nullable=False),
    sa.Column("source_format", sa.String, nullable=False),
    sa.Column("recipe_json", sa.Text, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("progress", sa.Float, nullable=False),
    sa.Column("stage", sa.String, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("variant_ids", sa.JSON, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("owner", sa.String, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("heartbeat_at", UtcDateTime, nullable=True),
    # The runner takes the oldest queued job; listings filter by model.
    sa.Index(None, "state", "created_at"),
    sa.Index(None, "model_name", "created_at"),
)
