"""Keep metric windows of removed devices and record removed device ids.

Revision ID: 20261205_remove_devices
Revises: 20261204_received_at
Create Date: 2026-12-05 08:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_remove_devices"
down_revision: str | Sequence[str] | None = "20261204_received_at"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRIC_TABLES = ("metric_batches", "metric_windows")


def upgrade() -> None:
    # NOTE: on SQLite the batch mode copies each metric table to drop its foreign key, which takes time
    # and disk space in proportion to the stored windows.
    for table in METRIC_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_device_id_devices", type_="foreignkey")
    op.create_table(
        "removed_devices",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("instance_key_hash", sa.String(), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_removed_devices")),
    )


def downgrade() -> None:
    op.drop_table("removed_devices")
    # Windows of devices removed meanwhile would violate the restored foreign key; they are deleted.
    for table in METRIC_TABLES:
        op.execute(f"DELETE FROM {table} WHERE device_id NOT IN (SELECT device_id FROM devices)")
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(
                f"fk_{table}_device_id_devices", "devices", ["device_id"], ["device_id"], ondelete="CASCADE"
            )
