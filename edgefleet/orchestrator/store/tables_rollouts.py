"""SQLAlchemy Core tables: rollouts, their waves and per-device outcomes."""

from __future__ import annotations

import sqlalchemy as sa

from edgefleet.orchestrator.store.tables import UtcDateTime, metadata

__all__ = ["metadata", "rollout_engine_lease", "rollout_wave_devices", "rollout_waves", "rollouts"]

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("rollout_id", sa.String, primary_key=True),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("target_labels", sa.JSON, nullable=False),
    sa.Column("target_hardware_class", sa.String, nullable=False),
    sa.Column("wave_percents", sa.JSON, nullable=False),
    sa.Column("budget_ms", sa.Float, nullable=False),
    sa.Column("max_p95_regression_pct", sa.Float, nullable=False),
    sa.Column("max_error_rate_pct", sa.Float, nullable=False),
    sa.Column("min_samples", sa.BigInteger, nullable=False),
    sa.Column("max_rollbacks", sa.Integer, nullable=False),
    sa.Column("sample_timeout_s", sa.Float, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("stuck", sa.Boolean, nullable=False),
    sa.Column("current_wave", sa.Integer, nullable=False),
    sa.Column("rollbacks", sa.Integer, nullable=False),
    sa.Column("plan", sa.JSON, nullable=False),
    sa.Column("superseded_by", sa.String, nullable=False),
    # Compare-and-set counter: every write checks and advances it, so the engine and an operator's
    # action never overwrite each other's change.
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=True),
    # Rollouts are listed per model, newest first, and a new rollout looks up the ones it supersedes.
    sa.Index(None, "model_name", "created_at"),
    # The engine loads the rollouts it still works on at every tick.
    sa.Index(None, "state"),
)

rollout_waves = sa.Table(
    "rollout_waves",
    metadata,
    sa.Column(
        "rollout_id", sa.String, sa.ForeignKey("rollouts.rollout_id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("wave_index", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("percent", sa.Integer, nullable=False),
    sa.Column("decision", sa.String, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("decided_at", UtcDateTime, nullable=True),
)

rollout_wave_devices = sa.Table(
    "rollout_wave_devices",
    metadata,
    # Not a foreign key to devices: the history of a rollout outlives a removed device.
    sa.Column("rollout_id", sa.String, primary_key=True),
    sa.Column("wave_index", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("device_id", sa.String, primary_key=True),
    sa.Column("hardware_class", sa.String, nullable=False),
    sa.Column("variant_id", sa.String, nullable=False),
    sa.Column("threads", sa.Integer, nullable=False),
    # "" in prev_variant_id means the device had no assignment of the model before the rollout.
    sa.Column("prev_variant_id", sa.String, nullable=False),
    sa.Column("prev_model_version", sa.String, nullable=False),
    sa.Column("prev_threads", sa.Integer, nullable=False),
    sa.Column("prev_rollout_id", sa.String, nullable=False),
    sa.Column("assigned_generation", sa.BigInteger, nullable=False),
    sa.Column("restored_generation", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("samples", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("p95_ms", sa.Float, nullable=True),
    sa.Column("baseline_p95_ms", sa.Float, nullable=True),
    sa.Column("verdict", sa.String, nullable=False),
    sa.Column("note", sa.String, nullable=False),
    sa.Column("late", sa.Boolean, nullable=False),
    sa.ForeignKeyConstraint(
        ["rollout_id", "wave_index", "attempt"],
        ["rollout_waves.rollout_id", "rollout_waves.wave_index", "rollout_waves.attempt"],
        ondelete="CASCADE",
    ),
    # Device views list the rollouts that touched one device.
    sa.Index(None, "device_id"),
)

# One row per named lease. The engine of one orchestrator process at a time holds the lease and
# advances rollouts, so two processes on one database never start the same wave twice.
rollout_engine_lease = sa.Table(
    "rollout_engine_lease",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("holder", sa.String, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
)
