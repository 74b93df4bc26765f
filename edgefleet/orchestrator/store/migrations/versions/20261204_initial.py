"""Create the initial schema: devices, models, variants, desired and reported state, metrics.

Revision ID: 20261204_initial
Revises:
Create Date: 2026-12-04 20:15:15.487771+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.DateTime:
    # The models wrap this type to force UTC; a revision keeps only the column type.
    return sa.DateTime(timezone=True)


def _row_id() -> sa.types.TypeEngine[int]:
    # SQLite assigns row ids only to a column declared exactly INTEGER PRIMARY KEY.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("instance_key_hash", sa.String(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("hardware_class", sa.String(), nullable=False),
        sa.Column("agent_version", sa.String(), nullable=False),
        sa.Column("registered_at", _timestamp(), nullable=False),
        sa.Column("last_seen", _timestamp(), nullable=True),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("desired_generation", sa.BigInteger(), nullable=False),
        sa.Column("reported_generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_hardware_class"), "devices", ["hardware_class"])

    op.create_table(
        "model_versions",
        sa.Column("id", _row_id(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_model_versions_name_version")),
    )
    op.create_index(op.f("ix_model_versions_name_created_at"), "model_versions", ["name", "created_at"])

    op.create_table(
        "device_labels",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_device_labels_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "key", name=op.f("pk_device_labels")),
    )
    op.create_index(op.f("ix_device_labels_key_value"), "device_labels", ["key", "value"])

    op.create_table(
        "hardware_profiles",
        sa.Column("id", _row_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("recorded_at", _timestamp(), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_hardware_profiles_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hardware_profiles")),
    )
    op.create_index(op.f("ix_hardware_profiles_device_id_id"), "hardware_profiles", ["device_id", "id"])

    op.create_table(
        "identity_conflicts",
        sa.Column("id", _row_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("key_fingerprint", sa.String(), nullable=False),
        sa.Column("peer", sa.String(), nullable=False),
        sa.Column("seen_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_identity_conflicts_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_conflicts")),
    )
    op.create_index(op.f("ix_identity_conflicts_device_id_seen_at"), "identity_conflicts", ["device_id", "seen_at"])

    op.create_table(
        "metric_batches",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("batch_id", sa.String(), nullable=False),
        sa.Column("received_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_metric_batches_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "batch_id", name=op.f("pk_metric_batches")),
    )
    op.create_table(
        "metric_windows",
        sa.Column("id", _row_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("batch_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("variant_id", sa.String(), nullable=False),
        sa.Column("hardware_class", sa.String(), nullable=False),
        sa.Column("window_start", _timestamp(), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("received_at", _timestamp(), nullable=False),
        sa.Column("inference_count", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("sketch", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_metric_windows_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_windows")),
    )
    op.create_index(op.f("ix_metric_windows_device_id_window_start"), "metric_windows", ["device_id", "window_start"])
    op.create_index(
        op.f("ix_metric_windows_hardware_class_window_start"),
        "metric_windows",
        ["hardware_class", "window_start"],
    )
    op.create_index(op.f("ix_metric_windows_model_name_window_start"), "metric_windows", ["model_name", "window_start"])
    op.create_index(op.f("ix_metric_windows_variant_id_window_start"), "metric_windows", ["variant_id", "window_start"])
    op.create_index(op.f("ix_metric_windows_window_start"), "metric_windows", ["window_start"])

    op.create_table(
        "model_statuses",
        sa.Column("id", _row_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("variant_id", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("error", sa.String(), nullable=False),
        sa.Column("runtime", sa.String(), nullable=False),
        sa.Column("providers", sa.JSON(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_model_statuses_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_statuses")),
    )
    op.create_index(op.f("ix_model_statuses_device_id_id"), "model_statuses", ["device_id", "id"])

    op.create_table(
        "variants",
        sa.Column("variant_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("precision", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("rejection_reason", sa.String(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("accuracy_metric", sa.String(), nullable=False),
        sa.Column("latency_ms", sa.JSON(), nullable=False),
        sa.Column("parent_variant_id", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_name", "model_version"],
            ["model_versions.name", "model_versions.version"],
            name=op.f("fk_variants_model_name_model_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("variant_id", name=op.f("pk_variants")),
    )
    op.create_index(
        op.f("ix_variants_model_name_model_version_created_at"),
        "variants",
        ["model_name", "model_version", "created_at"],
    )

    op.create_table(
        "assignments",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("variant_id", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_assignments_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["variant_id"], ["variants.variant_id"], name=op.f("fk_assignments_variant_id_variants")
        ),
        sa.PrimaryKeyConstraint("device_id", "model_name", name=op.f("pk_assignments")),
    )
    op.create_index(op.f("ix_assignments_variant_id"), "assignments", ["variant_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_assignments_variant_id"), table_name="assignments")

    op.drop_table("assignments")
    op.drop_index(op.f("ix_variants_model_name_model_version_created_at"), table_name="variants")

    op.drop_table("variants")
    op.drop_index(op.f("ix_model_statuses_device_id_id"), table_name="model_statuses")

    op.drop_table("model_statuses")
    op.drop_index(op.f("ix_metric_windows_window_start"), table_name="metric_windows")
    op.drop_index(op.f("ix_metric_windows_variant_id_window_start"), table_name="metric_windows")
    op.drop_index(op.f("ix_metric_windows_model_name_window_start"), table_name="metric_windows")
    op.drop_index(op.f("ix_metric_windows_hardware_class_window_start"), table_name="metric_windows")
    op.drop_index(op.f("ix_metric_windows_device_id_window_start"), table_name="metric_windows")

    op.drop_table("metric_windows")
    op.drop_table("metric_batches")
    op.drop_index(op.f("ix_identity_conflicts_device_id_seen_at"), table_name="identity_conflicts")

    op.drop_table("identity_conflicts")
    op.drop_index(op.f("ix_hardware_profiles_device_id_id"), table_name="hardware_profiles")

    op.drop_table("hardware_profiles")
    op.drop_index(op.f("ix_device_labels_key_value"), table_name="device_labels")

    op.drop_table("device_labels")
    op.drop_index(op.f("ix_model_versions_name_created_at"), table_name="model_versions")

    op.drop_table("model_versions")
    op.drop_index(op.f("ix_devices_hardware_class"), table_name="devices")

    op.drop_table("devices")
