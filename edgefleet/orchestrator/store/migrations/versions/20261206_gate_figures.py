"""Store more of what each variant's gate measured: the source's p50 latency beside the variant's,
the number of evaluation samples, and a digest of the evaluation data.

Revision ID: 20261206_gate_figures
Revises: 20261205_trusted_keys
Create Date: 2026-12-06 02:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261206_gate_figures"
down_revision: str | Sequence[str] | None = "20261205_trusted_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for variants gated before this revision: their gate kept none of these figures.
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("source_latency_ms", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("evaluation_samples", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("evaluation_digest", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("evaluation_digest")
        batch.drop_column("evaluation_samples")
        batch.drop_column("source_latency_ms")
