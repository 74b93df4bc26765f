"""SqlSecurityStore on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.orchestrator.security.store import (
    ApiTokenRecord,
    EnrollmentRejected,
    LastAdminTokenError,
    SqlSecurityStore,
)
from edgefleet.orchestrator.security.tokens import hash_secret
from edgefleet.orchestrator.store.base import NotFoundError
from edgefleet.orchestrator.store.engine import create_store_engine, upgrade_to_head

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(db_url: str) -> Iterator[SqlSecurityStore]:
    engine = create_store_engine(db_url)
    upgrade_to_head(engine)
    store = SqlSecurityStore(engine, owns_engine=True)
    yield store
    store.close()


def test_store_revoke_drops_credential(store: SqlSecurityStore) -> None:
    store.add_enrollment_token(hash_secret("efe_1"), "cam-1", NOW, NOW + timedelta(hours=1))
    store.enroll(hash_secret("efe_1"), "cam-1", "a" * 64, NOW)
    store.add_enrollment_token(hash_secret("efe_2"), "cam-1", NOW, NOW + timedelta(hours=1))

    store.revoke_device("cam-1", "lost", NOW)
    store.revoke_device("cam-1", "lost again", NOW)

    assert store.is_revoked("cam-1")
    assert store.credential_of("cam-1") is None
    with pytest.raises(EnrollmentRejected, match="not valid"):
        store.enroll(hash_secret("efe_2"), "cam-1", "a" * 64, NOW)


def test_store_reenroll_clears_revocation(store: SqlSecurityStore) -> None:
    store.revoke_device("cam-1", "lost", NOW)
    store.add_enrollment_token(hash_secret("efe_3"), "cam-1", NOW, NOW + timedelta(hours=1))

    store.enroll(hash_secret("efe_3"), "cam-1", "b" * 64, NOW)

    assert not store.is_revoked("cam-1")
    assert store.credential_of("cam-1") == "b" * 64


def test_store_api_tokens(store: SqlSecurityStore) -> None:
    store.add_api_token(ApiTokenRecord("t1", "ci", "viewer", NOW), hash_secret("efa_t1_x"))

    found = store.find_api_token(hash_secret("efa_t1_x"))
    revoked = store.revoke_api_token("t1", NOW + timedelta(minutes=1))
    again = store.revoke_api_token("t1", NOW + timedelta(minutes=2))

    assert found == ApiTokenRecord("t1", "ci", "viewer", NOW)
    assert revoked.revoked_at == NOW + timedelta(minutes=1)
    assert again.revoked_at == NOW + timedelta(minutes=1)
    with pytest.raises(NotFoundError):
        store.revoke_api_token("nope", NOW)


def test_store_keeps_last_admin(store: SqlSecurityStore) -> None:
    store.add_api_token(ApiTokenRecord("a1", "root", "admin", NOW), hash_secret("efa_a1_x"))
    store.add_api_token(ApiTokenRecord("v1", "ci", "viewer", NOW), hash_secret("efa_v1_x"))
    store.add_api_token(ApiTokenRecord("a2", "alice", "admin", NOW), hash_secret("efa_a2_x"))

    store.revoke_api_token("a1", NOW)
    with pytest.raises(LastAdminTokenError, match="a2"):
        store.revoke_api_token("a2", NOW)
    store.revoke_api_token("v1", NOW)

    assert [t.token_id for t in store.list_api_tokens() if t.revoked_at is None] == ["a2"]


def test_store_rollback_orders(store: SqlSecurityStore) -> None:
    store.set_rollback_order("cam-1", "net", "sha256:" + "a" * 64, NOW)
    store.set_rollback_order("cam-1", "net", "sha256:" + "b" * 64, NOW)
    store.set_rollback_order("cam-1", "other", "sha256:" + "c" * 64, NOW)

    store.clear_rollback_order("cam-1", "other")

    assert store.rollback_orders("cam-1") == {"net": "sha256:" + "b" * 64}
