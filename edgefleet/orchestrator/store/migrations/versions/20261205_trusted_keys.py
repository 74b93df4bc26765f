"""Store the signing key set each device reports that it trusts.

Revision ID: 20261205_trusted_keys
Revises: 20261205_accuracy_drop
Create Date: 2026-12-05 22:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_trusted_keys"
down_revision: str | Sequence[str] | None = "20261205_accuracy_drop"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Devices stored before this revision have reported nothing yet; their next report fills these in.
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("trusted_key_set_version", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("trusted_key_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("trusted_key_ids")
        batch.drop_column("trusted_key_set_version")
