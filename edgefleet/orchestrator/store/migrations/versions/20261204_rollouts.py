"""Add rollouts and waves.

Revision ID: 20261204_rollouts
Revises: 20261204_jobs
Create Date: 2026-12-04 20:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_rollouts"
down_revision: str | Sequence[str] | None = "20261204_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.DateTime:
    # The models wrap this type to force UTC; a revision keeps only the column type.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("rollout_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("target_labels", sa.JSON(), nullable=False),
        sa.Column("target_hardware_class", sa.String(), nullable=False),
        sa.Column("wave_percents", sa.JSON(), nullable=False),
        sa.Column("budget_ms", sa.Float(), nullable=False),
        sa.Column("max_p95_regression_pct", sa.Float(), nullable=False),
        sa.Column("max_error_rate_pct", sa.Float(), nullable=False),
        sa.Column("min_samples", sa.BigInteger(), nullable=False),
        sa.Column("max_rollbacks", sa.Integer(), nullable=False),
        sa.Column("sample_timeout_s", sa.Float(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("stuck", sa.Boolean(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("rollbacks", sa.Integer(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("superseded_by", sa.String(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_model_name_created_at"), "rollouts", ["model_name", "created_at"])
    op.create_index(op.f("ix_rollouts_state"), "rollouts", ["state"])

    op.create_table(
        "rollout_waves",
        sa.Column("rollout_id", sa.String(), nullable=False),
        sa.Column("wave_index", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("percent", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("decided_at", _timestamp(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.rollout_id"],
            name=op.f("fk_rollout_waves_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "wave_index", "attempt", name=op.f("pk_rollout_waves")),
    )

    op.create_table(
        "rollout_wave_devices",
        sa.Column("rollout_id", sa.String(), nullable=False),
        sa.Column("wave_index", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("hardware_class", sa.String(), nullable=False),
        sa.Column("variant_id", sa.String(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("prev_variant_id", sa.String(), nullable=False),
        sa.Column("prev_model_version", sa.String(), nullable=False),
        sa.Column("prev_threads", sa.Integer(), nullable=False),
        sa.Column("prev_rollout_id", sa.String(), nullable=False),
        sa.Column("assigned_generation", sa.BigInteger(), nullable=False),
        sa.Column("restored_generation", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("baseline_p95_ms", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(), nullable=False),
        sa.Column("note", sa.String(), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id", "wave_index", "attempt"],
            ["rollout_waves.rollout_id", "rollout_waves.wave_index", "rollout_waves.attempt"],
            name=op.f("fk_rollout_wave_devices_rollout_id_wave_index_attempt_rollout_waves"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "rollout_id", "wave_index", "attempt", "device_id", name=op.f("pk_rollout_wave_devices")
        ),
    )
    op.create_index(op.f("ix_rollout_wave_devices_device_id"), "rollout_wave_devices", ["device_id"])

    op.create_table(
        "rollout_engine_lease",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("holder", sa.String(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rollout_engine_lease")),
    )


def downgrade() -> None:
    op.drop_table("rollout_engine_lease")
    op.drop_index(op.f("ix_rollout_wave_devices_device_id"), table_name="rollout_wave_devices")
    op.drop_table("rollout_wave_devices")
    op.drop_table("rollout_waves")
    op.drop_index(op.f("ix_rollouts_state"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_model_name_created_at"), table_name="rollouts")
    op.drop_table("rollouts")
