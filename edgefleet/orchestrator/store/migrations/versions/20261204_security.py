"""Add enrollment tokens, API tokens and signing keys.

Revision ID: 20261204_security
Revises: 20261204_rollouts
Create Date: 2026-12-04 20:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_security"
down_revision: str | Sequence[str] | None = "20261204_rollouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.DateTime:
    # The models wrap this type to force UTC; a revision keeps only the column type.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.Column("used_at", _timestamp(), nullable=True),
        sa.Column("used_fingerprint", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_enrollment_tokens")),
    )
    op.create_index(op.f("ix_enrollment_tokens_device_id"), "enrollment_tokens", ["device_id"])
    op.create_table(
        "device_credentials",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("cert_fingerprint", sa.String(), nullable=False),
        sa.Column("enrolled_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_credentials")),
    )
    op.create_table(
        "revoked_devices",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("revoked_at", _timestamp(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_revoked_devices")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("revoked_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("private_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("retired_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_signing_keys")),
    )
    op.create_table(
        "security_counters",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_security_counters")),
    )
    op.create_table(
        "rollback_orders",
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("ordered_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "model_name", name=op.f("pk_rollback_orders")),
    )


def downgrade() -> None:
    op.drop_table("rollback_orders")
    op.drop_table("security_counters")
    op.drop_table("signing_keys")
    op.drop_table("api_tokens")
    op.drop_table("revoked_devices")
    op.drop_table("device_credentials")
    op.drop_index(op.f("ix_enrollment_tokens_device_id"), table_name="enrollment_tokens")
    op.drop_table("enrollment_tokens")
