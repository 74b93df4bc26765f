"""Add compression jobs.

Revision ID: 20261204_jobs
Revises: 20261204_initial
Create Date: 2026-12-04 20:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_jobs"
down_revision: str | Sequence[str] | None = "20261204_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.DateTime:
    # The models wrap this type to force UTC; a revision keeps only the column type.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "compression_jobs",
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("source_variant_id", sa.String(), nullable=False),
        sa.Column("source_digest", sa.String(), nullable=False),
        sa.Column("source_format", sa.String(), nullable=False),
        sa.Column("recipe_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("variant_ids", sa.JSON(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.Column("heartbeat_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_compression_jobs")),
    )
    op.create_index(op.f("ix_compression_jobs_state_created_at"), "compression_jobs", ["state", "created_at"])
    op.create_index(op.f("ix_compression_jobs_model_name_created_at"), "compression_jobs", ["model_name", "created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_compression_jobs_model_name_created_at"), table_name="compression_jobs")
    op.drop_index(op.f("ix_compression_jobs_state_created_at"), table_name="compression_jobs")
    op.drop_table("compression_jobs")
