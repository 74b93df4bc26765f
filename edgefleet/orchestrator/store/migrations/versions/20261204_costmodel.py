"""Add on-device benchmark results for the cost model.

Revision ID: 20261204_costmodel
Revises: 20261204_security
Create Date: 2026-12-04 20:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_costmodel"
down_revision: str | Sequence[str] | None = "20261204_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "benchmark_results",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("variant_id", sa.String(), nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("hardware_class", sa.String(), nullable=False),
        sa.Column("runtime", sa.String(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=False),
        sa.Column("p95_ms", sa.Float(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        # The models wrap this type to force UTC; a revision keeps only the column type.
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["variant_id"],
            ["variants.variant_id"],
            name=op.f("fk_benchmark_results_variant_id_variants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_benchmark_results_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_benchmark_results")),
    )
    op.create_index(
        op.f("ix_benchmark_results_variant_id_hardware_class"), "benchmark_results", ["variant_id", "hardware_class"]
    )
    op.create_index(op.f("ix_benchmark_results_hardware_class"), "benchmark_results", ["hardware_class"])
    op.create_index(op.f("ix_benchmark_results_device_id"), "benchmark_results", ["device_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_benchmark_results_device_id"), table_name="benchmark_results")
    op.drop_index(op.f("ix_benchmark_results_hardware_class"), table_name="benchmark_results")
    op.drop_index(op.f("ix_benchmark_results_variant_id_hardware_class"), table_name="benchmark_results")
    op.drop_table("benchmark_results")
