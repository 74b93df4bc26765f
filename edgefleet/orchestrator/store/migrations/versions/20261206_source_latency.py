"""Store the source's p50 latency that each variant's gate measured beside the variant's own.

Revision ID: 20261206_source_latency
Revises: 20261205_trusted_keys
Create Date: 2026-12-06 01:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261206_source_latency"
down_revision: str | Sequence[str] | None = "20261205_trusted_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for variants gated before this revision: the source's figure from their gate was not kept.
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("source_latency_ms", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("source_latency_ms")
