"""SQLAlchemy Core tables: enrollment tokens, device credentials, API tokens and signing keys."""

from __future__ import annotations

import sqlalchemy as sa

from edgefleet.orchestrator.store.tables import UtcDateTime, metadata

__all__ = [
    "api_tokens",
    "device_credentials",
    "enrollment_tokens",
    "metadata",
    "revoked_devices",
    "rollback_orders",
    "security_counters",
    "signing_keys",
]

# Single-use tokens that admit one device id at its first registration. Only the SHA-256 of the
# secret is stored; used_at is set by the registration that consumed the token.
enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    sa.Column("token_hash", sa.String, primary_key=True),
    sa.Column("device_id", sa.String, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("used_at", UtcDateTime, nullable=True),
    sa.Column("used_fingerprint", sa.String, nullable=False),
    sa.Index(None, "device_id"),
)

# The certificate each enrolled device registered with (SHA-256 of its DER encoding). Devices are not
# referenced by foreign key: a credential exists from enrollment on, before the device row.
device_credentials = sa.Table(
    "device_credentials",
    metadata,
    sa.Column("device_id", sa.String, primary_key=True),
    sa.Column("cert_fingerprint", sa.String, nullable=False),
    sa.Column("enrolled_at", UtcDateTime, nullable=False),
)

revoked_devices = sa.Table(
    "revoked_devices",
    metadata,
    sa.Column("device_id", sa.String, primary_key=True),
    sa.Column("revoked_at", UtcDateTime, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
)

# Operator API tokens. token_hash is the SHA-256 hex of the whole secret; token_id is public.
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("token_id", sa.String, primary_key=True),
    sa.Column("token_hash", sa.String, nullable=False, unique=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("role", sa.String, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
)

# Ed25519 keys that sign assignments. Every orchestrator process of the fleet signs with the newest
# key that is not retired, so the private key is shared through the database.
signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("key_id", sa.String, primary_key=True),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    sa.Column("private_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("retired_at", UtcDateTime, nullable=True),
)

# Named monotonic counters; "key_set_version" counts changes of the signing key set.
security_counters = sa.Table(
    "security_counters",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

# Assignments that an operator deployed with the rollback flag: their signature carries rollback=true.
rollback_orders = sa.Table(
    "rollback_orders",
    metadata,
    sa.Column("device_id", sa.String, primary_key=True),
    sa.Column("model_name", sa.String, primary_key=True),
    sa.Column("digest", sa.String, nullable=False),
    sa.Column("ordered_at", UtcDateTime, nullable=False),
)
