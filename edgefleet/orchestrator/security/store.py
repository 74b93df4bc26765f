"""Durable security state: enrollment tokens, device credentials, revocations, API tokens and signing keys."""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from edgefleet.orchestrator.store.base import NotFoundError, StoreError
from edgefleet.orchestrator.store.engine import SqlTransactions
from edgefleet.orchestrator.store.tables import devices
from edgefleet.orchestrator.store.tables_security import (
    api_tokens,
    device_credentials,
    enrollment_tokens,
    revoked_devices,
    rollback_orders,
    security_counters,
    signing_keys,
)

logger = logging.getLogger(__name__)

KEY_SET_VERSION = "key_set_version"


@dataclass(frozen=True)
class ApiTokenRecord:
    token_id: str
    name: str
    role: str  # "viewer", "operator" or "admin".
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class EnrollmentTokenRecord:
    token_id: str  # The first ENROLLMENT_TOKEN_ID_LENGTH hex digits of the secret's hash.
    device_id: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None


# Hex digits of an enrollment token's hash that name it. 48 bits: two of a fleet's tokens share an id
# with a chance of about n^2 / 2^49, and revoke_enrollment_token rejects an id that matches two.
ENROLLMENT_TOKEN_ID_LENGTH = 12


@dataclass(frozen=True)
class SigningKeyRecord:
    key_id: str
    public_key: bytes  # Raw 32-byte Ed25519 public key.
    private_key: bytes  # Raw 32-byte Ed25519 private key.
    created_at: datetime
    retired_at: datetime | None = None


class LastAdminTokenError(Exception):
    """Revoking the token would leave no active admin token, and no API call can create one again."""


class EnrollmentRejected(Exception):
    """An enrollment token is unknown, expired, used or made for another device; reason names which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "unknown", "expired", "used" or "other_device".


class SecurityStore(abc.ABC):
    """Security records of the fleet. Methods are synchronous and thread-safe; each one is one transaction."""

    @abc.abstractmethod
    def add_enrollment_token(self, token_hash: str, device_id: str, created_at: datetime, expires_at: datetime) -> None:
        """Store a new enrollment token by its hash."""

    @abc.abstractmethod
    def list_enrollment_tokens(self, device_id: str = "") -> list[EnrollmentTokenRecord]:
        """Return the enrollment tokens, of device_id only when it is set, newest first."""

    @abc.abstractmethod
    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord:
        """Delete the unused enrollment token named token_id and return it.

        Raises NotFoundError for an unknown id and StoreError for a used token or an id of two tokens.
        """

    @abc.abstractmethod
    def enroll(
        self, token_hash: str, device_id: str, fingerprint: str, now: datetime, instance_key_hash: str = ""
    ) -> bool:
        """Consume an enrollment token and bind device_id to a certificate fingerprint, in one transaction.

        Also clears a revocation of device_id and, when instance_key_hash is set, binds a registered
        device_id to that agent instance key: the token is an admin's consent to a re-imaged or
        replaced device taking over the id. Returns whether a different instance key was replaced.
        Raises EnrollmentRejected, changing nothing, when the token is unknown, expired, used or made
        for another device.
        """

    @abc.abstractmethod
    def credential_of(self, device_id: str) -> str | None:
        """Return the certificate fingerprint bound to device_id, or None when it is not enrolled."""

    @abc.abstractmethod
    def revoke_device(self, device_id: str, reason: str, now: datetime) -> None:
        """Mark device_id revoked, drop its credential and its unused enrollment tokens."""

    @abc.abstractmethod
    def is_revoked(self, device_id: str) -> bool: ...

    @abc.abstractmethod
    def revoked_device_ids(self) -> frozenset[str]:
        """Return the ids of every revoked device."""

    @abc.abstractmethod
    def add_api_token(self, record: ApiTokenRecord, token_hash: str) -> None:
        """Store an API token by the hash of its secret."""

    @abc.abstractmethod
    def find_api_token(self, token_hash: str) -> ApiTokenRecord | None:
        """Return the token with this secret hash, revoked ones included, or None."""

    @abc.abstractmethod
    def list_api_tokens(self) -> list[ApiTokenRecord]:
        """Return every API token, oldest first."""

    @abc.abstractmethod
    def revoke_api_token(self, token_id: str, now: datetime) -> ApiTokenRecord:
        """Revoke a token (again revoking one keeps the first time).

        Raises NotFoundError for an unknown id and LastAdminTokenError, changing nothing, for the only
        active admin token.
        """

    @abc.abstractmethod
    def add_signing_key(self, record: SigningKeyRecord) -> int:
        """Store a new signing key and return the new key set version."""

    @abc.abstractmethod
    def list_signing_keys(self) -> tuple[int, list[SigningKeyRecord]]:
        """Return the key set version and the keys that are not retired, oldest first."""

    @abc.abstractmethod
    def retire_signing_key(self, key_id: str, now: datetime) -> int:
        """Retire a key and return the new key set version; raise NotFoundError for an unknown or retired id."""

    @abc.abstractmethod
    def set_rollback_order(self, device_id: str, model_name: str, digest: str, now: datetime) -> None:
        """Record that the assignment of digest to device_id carries the operator's rollback flag."""

    @abc.abstractmethod
    def clear_rollback_order(self, device_id: str, model_name: str) -> None: ...

    @abc.abstractmethod
    def rollback_orders(self, device_id: str) -> Mapping[str, str]:
        """Return the rolled-back digest by model name for device_id."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SqlSecurityStore(SqlTransactions, SecurityStore):
    """A SecurityStore on the SQL store's engine (SqlStore.engine), with the schema at head.

    close() disposes the engine only when owns_engine is set, so a store on a shared engine leaves it to its owner.
    """

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        super().__init__(engine)
        self._owns_engine = owns_engine

    def _upsert(self, connection: Connection, table: sa.Table, values: dict[str, Any], keys: list[str]) -> None:
        dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(table).values(**values)
        updates = {name: statement.excluded[name] for name in values if name not in keys}
        connection.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates))

    # Enrollment and devices

    def add_enrollment_token(self, token_hash: str, device_id: str, created_at: datetime, expires_at: datetime) -> None:
        with self._write() as connection:
            connection.execute(
                enrollment_tokens.insert().values(
                    token_hash=token_hash,
                    device_id=device_id,
                    created_at=created_at,
                    expires_at=expires_at,
                    used_at=None,
                    used_fingerprint="",
                )
            )

    def list_enrollment_tokens(self, device_id: str = "") -> list[EnrollmentTokenRecord]:
        query = sa.select(enrollment_tokens).order_by(
            enrollment_tokens.c.created_at.desc(), enrollment_tokens.c.token_hash
        )
        if device_id:
            query = query.where(enrollment_tokens.c.device_id == device_id)
        with self._read() as connection:
            return [_enrollment_token_from_row(row) for row in connection.execute(query)]

    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord:
        with self._write() as connection:
            rows = connection.execute(
                sa.select(enrollment_tokens).where(enrollment_tokens.c.token_hash.startswith(token_id, autoescape=True))
            ).all()
            if not rows:
                raise NotFoundError(f"enrollment token {token_id!r} not found; list them with `edgefleet enroll list`")
            if len(rows) > 1:
                raise StoreError(
                    f"enrollment token id {token_id!r} names {len(rows)} tokens; revoke their devices instead"
                )
            record = _enrollment_token_from_row(rows[0])
            if record.used_at is not None:
                raise StoreError(
                    f"enrollment token {token_id} was used by device {record.device_id!r} at "
                    f"{record.used_at:%Y-%m-%dT%H:%M:%SZ}; revoke the device instead "
                    f"(edgefleet devices revoke {record.device_id})"
                )
            connection.execute(enrollment_tokens.delete().where(enrollment_tokens.c.token_hash == rows[0].token_hash))
        return record

    def enroll(
        self, token_hash: str, device_id: str, fingerprint: str, now: datetime, instance_key_hash: str = ""
    ) -> bool:
        with self._write() as connection:
            # One conditional UPDATE consumes the token, so two registrations racing for it cannot both win.
            consumed = connection.execute(
                enrollment_tokens.update()
                .where(
                    enrollment_tokens.c.token_hash == token_hash,
                    enrollment_tokens.c.device_id == device_id,
                    enrollment_tokens.c.used_at.is_(None),
                    enrollment_tokens.c.expires_at > now,
                )
                .values(used_at=now, used_fingerprint=fingerprint)
            ).rowcount
            if consumed != 1:
                row = connection.execute(
                    sa.select(enrollment_tokens).where(enrollment_tokens.c.token_hash == token_hash)
                ).first()
                raise _rejection(row, device_id, now)
            self._upsert(
                connection,
                device_credentials,
                {"device_id": device_id, "cert_fingerprint": fingerprint, "enrolled_at": now},
                ["device_id"],
            )
            connection.execute(revoked_devices.delete().where(revoked_devices.c.device_id == device_id))
            if not instance_key_hash:
                return False
            rebound = connection.execute(
                devices.update()
                .where(devices.c.device_id == device_id, devices.c.instance_key_hash != instance_key_hash)
                .values(instance_key_hash=instance_key_hash)
            ).rowcount
            return rebound == 1

    def credential_of(self, device_id: str) -> str | None:
        with self._read() as connection:
            value = connection.execute(
                sa.select(device_credentials.c.cert_fingerprint).where(device_credentials.c.device_id == device_id)
            ).scalar()
        return None if value is None else str(value)

    def revoke_device(self, device_id: str, reason: str, now: datetime) -> None:
        with self._write() as connection:
            self._upsert(
                connection,
                revoked_devices,
                {"device_id": device_id, "revoked_at": now, "reason": reason},
                ["device_id"],
            )
            connection.execute(device_credentials.delete().where(device_credentials.c.device_id == device_id))
            connection.execute(
                enrollment_tokens.delete().where(
                    enrollment_tokens.c.device_id == device_id, enrollment_tokens.c.used_at.is_(None)
                )
            )

    def is_revoked(self, device_id: str) -> bool:
        with self._read() as connection:
            row = connection.execute(
                sa.select(revoked_devices.c.device_id).where(revoked_devices.c.device_id == device_id)
            ).first()
        return row is not None

    def revoked_device_ids(self) -> frozenset[str]:
        with self._read() as connection:
            return frozenset(connection.execute(sa.select(revoked_devices.c.device_id)).scalars())

    # API tokens

    def add_api_token(self, record: ApiTokenRecord, token_hash: str) -> None:
        with self._write() as connection:
            connection.execute(
                api_tokens.insert().values(
                    token_id=record.token_id,
                    token_hash=token_hash,
                    name=record.name,
                    role=record.role,
                    created_at=record.created_at,
                    revoked_at=record.revoked_at,
                )
            )

    def find_api_token(self, token_hash: str) -> ApiTokenRecord | None:
        with self._read() as connection:
            row = connection.execute(sa.select(api_tokens).where(api_tokens.c.token_hash == token_hash)).first()
        return None if row is None else _token_from_row(row)

    def list_api_tokens(self) -> list[ApiTokenRecord]:
        with self._read() as connection:
            result = connection.execute(sa.select(api_tokens).order_by(api_tokens.c.created_at, api_tokens.c.token_id))
            return [_token_from_row(row) for row in result]

    def revoke_api_token(self, token_id: str, now: datetime) -> ApiTokenRecord:
        with self._write() as connection:
            # Locking every active admin row makes two concurrent revokes of the last two admins take turns.
            active_admins = (
                connection.execute(
                    sa.select(api_tokens.c.token_id)
                    .where(api_tokens.c.role == "admin", api_tokens.c.revoked_at.is_(None))
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            if active_admins == [token_id]:
                raise LastAdminTokenError(
                    f"API token {token_id} is the only active admin token; create another admin token first "
                    "(edgefleet tokens create --role admin), because none can be created once the last is revoked"
                )
            connection.execute(
                api_tokens.update()
                .where(api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = connection.execute(sa.select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
        if row is None:
            raise NotFoundError(f"API token {token_id!r} not found; list the tokens with `edgefleet tokens list`")
        return _token_from_row(row)

    # Signing keys

    def _bump_key_set_version(self, connection: Connection) -> int:
        current = connection.execute(
            sa.select(security_counters.c.value).where(security_counters.c.name == KEY_SET_VERSION).with_for_update()
        ).scalar()
        version = int(current or 0) + 1
        self._upsert(connection, security_counters, {"name": KEY_SET_VERSION, "value": version}, ["name"])
        return version

    def add_signing_key(self, record: SigningKeyRecord) -> int:
        with self._write() as connection:
            connection.execute(
                signing_keys.insert().values(
                    key_id=record.key_id,
                    public_key=record.public_key,
                    private_key=record.private_key,
                    created_at=record.created_at,
                    retired_at=record.retired_at,
                )
            )
            return self._bump_key_set_version(connection)

    def list_signing_keys(self) -> tuple[int, list[SigningKeyRecord]]:
        with self._read() as connection:
            version = connection.execute(
                sa.select(security_counters.c.value).where(security_counters.c.name == KEY_SET_VERSION)
            ).scalar()
            result = connection.execute(
                sa.select(signing_keys)
                .where(signing_keys.c.retired_at.is_(None))
                .order_by(signing_keys.c.created_at, signing_keys.c.key_id)
            )
            keys = [
                SigningKeyRecord(
                    key_id=row.key_id,
                    public_key=bytes(row.public_key),
                    private_key=bytes(row.private_key),
                    created_at=row.created_at,
                    retired_at=row.retired_at,
                )
                for row in result
            ]
        return int(version or 0), keys

    def retire_signing_key(self, key_id: str, now: datetime) -> int:
        with self._write() as connection:
            changed = connection.execute(
                signing_keys.update()
                .where(signing_keys.c.key_id == key_id, signing_keys.c.retired_at.is_(None))
                .values(retired_at=now)
            ).rowcount
            if changed != 1:
                raise NotFoundError(
                    f"signing key {key_id!r} not found or already retired; list the keys with `edgefleet keys list`"
                )
            return self._bump_key_set_version(connection)

    # Rollback orders

    def set_rollback_order(self, device_id: str, model_name: str, digest: str, now: datetime) -> None:
        with self._write() as connection:
            self._upsert(
                connection,
                rollback_orders,
                {"device_id": device_id, "model_name": model_name, "digest": digest, "ordered_at": now},
                ["device_id", "model_name"],
            )

    def clear_rollback_order(self, device_id: str, model_name: str) -> None:
        with self._write() as connection:
            connection.execute(
                rollback_orders.delete().where(
                    rollback_orders.c.device_id == device_id, rollback_orders.c.model_name == model_name
                )
            )

    def rollback_orders(self, device_id: str) -> Mapping[str, str]:
        with self._read() as connection:
            result = connection.execute(
                sa.select(rollback_orders.c.model_name, rollback_orders.c.digest).where(
                    rollback_orders.c.device_id == device_id
                )
            )
            return {row.model_name: row.digest for row in result}

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()


def _token_from_row(row: Any) -> ApiTokenRecord:
    return ApiTokenRecord(
        token_id=row.token_id, name=row.name, role=row.role, created_at=row.created_at, revoked_at=row.revoked_at
    )


def _enrollment_token_from_row(row: Any) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(
        token_id=row.token_hash[:ENROLLMENT_TOKEN_ID_LENGTH],
        device_id=row.device_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        used_at=row.used_at,
    )


def _rejection(row: Any, device_id: str, now: datetime) -> EnrollmentRejected:
    """Explain why an enrollment token did not admit device_id."""
    fix = f"create a new one with `edgefleet enroll create --device-id {device_id}`"
    if row is None:
        return EnrollmentRejected("unknown", f"the enrollment token is not valid; {fix}")
    if row.used_at is not None:
        return EnrollmentRejected(
            "used", f"the enrollment token was already used at {row.used_at:%Y-%m-%dT%H:%M:%SZ}; {fix}"
        )
    if row.expires_at <= now:
        return EnrollmentRejected(
            "expired", f"the enrollment token expired at {row.expires_at:%Y-%m-%dT%H:%M:%SZ}; {fix}"
        )
    return EnrollmentRejected(
        "other_device", f"the enrollment token was created for device {row.device_id!r}, not {device_id!r}; {fix}"
    )
