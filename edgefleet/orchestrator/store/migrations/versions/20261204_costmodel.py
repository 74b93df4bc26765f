"""Add on-device benchmark results for the cost model.

Revision ID: 20261204_costmodel
Revises: 20261204_security
Create Date: 2026-12-04 20:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "20261204_costmodel"
down_revision: str | Sequence[str] | None = "20261204_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
