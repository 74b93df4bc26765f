"""Record the desired generation of removed devices, so that a readmitted id continues above it.

Revision ID: 20261205_removed_generation
Revises: 20261205_remove_devices
Create Date: 2026-12-05 08:45:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_removed_generation"
down_revision: str | Sequence[str] | None = "20261205_remove_devices"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NOTE: devices removed before this revision get 0, so their generations restart as before.
    with op.batch_alter_table("removed_devices") as batch:
        batch.add_column(sa.Column("desired_generation", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("removed_devices") as batch:
        batch.drop_column("desired_generation")
