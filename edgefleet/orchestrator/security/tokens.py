"""Enrollment tokens for devices and API tokens with roles for operators; only hashes are stored."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from edgefleet.common.errors import InvalidArgument
from edgefleet.orchestrator.security.store import ApiTokenRecord, SecurityStore

log = logging.getLogger(__name__)

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
# Each role includes the rights of the roles before it.
ROLES = (VIEWER, OPERATOR, ADMIN)
API_TOKEN_PREFIX = "efa_"
ENROLLMENT_TOKEN_PREFIX = "efe_"
DEFAULT_ENROLLMENT_TTL = timedelta(hours=24)
MAX_ENROLLMENT_TTL = timedelta(days=30)
BOOTSTRAP_TOKEN_FILE = "admin.token"
BOOTSTRAP_TOKEN_NAME = "bootstrap-admin"
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def hash_secret(secret: str) -> str:
    """Return the SHA-256 hex digest that the store keeps in place of a token secret.

    A plain hash suffices: secrets carry 256 random bits, so no dictionary or brute-force search applies.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def role_allows(role: str, required: str) -> bool:
    """Return whether a token of role may call an RPC that requires the role required."""
    if role not in ROLES or required not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(required)


def check_role(role: str) -> None:
    """Raise InvalidArgument unless role is one of ROLES."""
    if role not in ROLES:
        raise InvalidArgument("role", f"{role!r} is not a role; use one of {', '.join(ROLES)}")


def create_api_token(store: SecurityStore, name: str, role: str, now: datetime) -> tuple[ApiTokenRecord, str]:
    """Create and store an API token; return its record and the secret, which is not stored.

    Raises InvalidArgument for an invalid name or role.
    """
    if not _TOKEN_NAME.fullmatch(name):
        raise InvalidArgument(
            "name",
            f"{name!r} must be 1-64 ASCII letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
        )
    check_role(role)
    token_id = secrets.token_hex(6)
    secret = f"{API_TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    record = ApiTokenRecord(token_id=token_id, name=name, role=role, created_at=now)
    store.add_api_token(record, hash_secret(secret))
    log.info("created API token %s (%s) with role %s", token_id, name, role)
    return record, secret


def create_enrollment_token(
    store: SecurityStore, device_id: str, ttl: timedelta, now: datetime
) -> tuple[str, datetime]:
    """Create and store a single-use enrollment token for device_id; return the secret and its expiry.

    Raises InvalidArgument for a TTL that is not positive or longer than MAX_ENROLLMENT_TTL.
    """
    if ttl <= timedelta(0) or ttl > MAX_ENROLLMENT_TTL:
        raise InvalidArgument(
            "ttl",
            f"{int(ttl.total_seconds())} s ({ttl.total_seconds() / 86400:.4g} days) is out of range; "
            f"use more than 0 and at most {MAX_ENROLLMENT_TTL.days} days (--ttl {MAX_ENROLLMENT_TTL.days}d)",
        )
    secret = ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = now + ttl
    store.add_enrollment_token(hash_secret(secret), device_id, now, expires_at)
    log.info("created an enrollment token for device_id=%s, valid until %s", device_id, expires_at.isoformat())
    return secret, expires_at


def ensure_bootstrap_token(store: SecurityStore, data_dir: Path, now: datetime) -> Path | None:
    """Create an admin token when the store has no API token at all, and write it to DATA_DIR/admin.token.

    The file is created with mode 0600. An admin.token left there belongs to another database, or to
    this one before it was emptied, so it is renamed to admin.token.replaced-TIME rather than
    overwritten: it may be the only admin token of that other database. Returns the path of the new
    file, or None when tokens exist already.
    """
    if store.list_api_tokens():
        return None
    _, secret = create_api_token(store, BOOTSTRAP_TOKEN_NAME, ADMIN, now)
    path = data_dir / BOOTSTRAP_TOKEN_FILE
    if path.exists():
        kept = path.with_name(f"{BOOTSTRAP_TOKEN_FILE}.replaced-{now.strftime('%Y%m%dT%H%M%S%fZ')}")
        os.replace(path, kept)
        log.warning(
            "%s held a token that this database does not know (the data directory was used with another "
            "database, or this one was emptied); moved it to %s, where it still works against its own database",
            path,
            kept,
        )
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    os.replace(temporary, path)
    return path
