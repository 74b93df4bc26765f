"""Store a digest of the evaluation data that each variant's accuracy drop was measured on.

Revision ID: 20261206_evaluation_digest
Revises: 20261206_evaluation_samples
Create Date: 2026-12-06 03:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261206_evaluation_digest"
down_revision: str | Sequence[str] | None = "20261206_evaluation_samples"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for variants gated before this revision: which data their gate used is unknown.
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("evaluation_digest", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("evaluation_digest")
