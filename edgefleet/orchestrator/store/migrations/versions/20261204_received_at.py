"""Index metric windows by receive time for retention and skew-aware queries.

Revision ID: 20261204_received_at
Revises: 20261204_costmodel
Create Date: 2026-12-04 21:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261204_received_at"
down_revision: str | Sequence[str] | None = "20261204_costmodel"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_metric_windows_received_at", "metric_windows", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_metric_windows_received_at", table_name="metric_windows")
