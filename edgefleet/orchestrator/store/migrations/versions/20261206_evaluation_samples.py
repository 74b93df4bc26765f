"""Store the number of evaluation samples that each variant's accuracy was measured on.

Revision ID: 20261206_evaluation_samples
Revises: 20261206_source_latency
Create Date: 2026-12-06 02:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261206_evaluation_samples"
down_revision: str | Sequence[str] | None = "20261206_source_latency"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for variants gated before this revision: their gate did not keep the count.
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("evaluation_samples", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("evaluation_samples")
