"""Store each variant's accuracy drop against its source, measured on the data of its own gate.

Revision ID: 20261205_accuracy_drop
Revises: 20261205_removed_generation
Create Date: 2026-12-05 20:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_accuracy_drop"
down_revision: str | Sequence[str] | None = "20261205_removed_generation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("accuracy_drop", sa.Float(), nullable=True))
    variants = sa.table(
        "variants",
        sa.column("kind", sa.String()),
        sa.column("accuracy", sa.Float()),
        sa.column("accuracy_metric", sa.String()),
        sa.column("accuracy_drop", sa.Float()),
    )
    op.execute(variants.update().where(variants.c.kind == "source").values(accuracy_drop=0.0))
    # The source agrees with itself on every sample, so an agreement figure gives the drop exactly.
    # NOTE: a top-1 figure against labels does not, because the source's figure on the same data was not
    # kept. Those variants keep no drop, so selection ranks them as unmeasured.
    op.execute(
        variants.update()
        .where(
            variants.c.kind != "source",
            variants.c.accuracy_metric == "top1_agreement",
            variants.c.accuracy.is_not(None),
        )
        .values(accuracy_drop=(1.0 - variants.c.accuracy) * 100.0)
    )


def downgrade() -> None:
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("accuracy_drop")
