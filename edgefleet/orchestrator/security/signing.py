"""Ed25519 signing of assignments and of the signing key set, with key rotation and retirement."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.common.errors import FailedPrecondition
from edgefleet.common.signatures import assignment_payload, key_id_of, key_set_payload
from edgefleet.orchestrator.security.store import SecurityStore, SigningKeyRecord
from edgefleet.v1 import agent_pb2

log = logging.getLogger(__name__)

# Keys read from the store are reused for this long, so another orchestrator process's rotation
# takes effect here within it.
KEY_CACHE_S = 10.0


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


class Signer:
    """Signs assignments with the newest signing key and key sets with every key in the set.

    Thread-safe. The newest key that is not retired signs new assignments; a rotation adds a key
    and makes it the newest.
    """

    def __init__(self, store: SecurityStore, *, cache_s: float = KEY_CACHE_S) -> None:
        self.store = store
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, int, list[SigningKeyRecord], agent_pb2.TrustedKeys] | None = None

    def ensure_key(self, now: datetime) -> None:
        """Create the first signing key when the store has none."""
        _, keys = self.store.list_signing_keys()
        if not keys:
            self.rotate(now)

    def _load(self) -> tuple[int, list[SigningKeyRecord], agent_pb2.TrustedKeys]:
        with self._lock:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self.cache_s:
                return cached[1], cached[2], cached[3]
            version, keys = self.store.list_signing_keys()
            key_set = _signed_key_set(version, keys)
            self._cached = (time.monotonic(), version, keys, key_set)
            return version, keys, key_set

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def key_set(self) -> agent_pb2.TrustedKeys:
        """Return the current key set, signed by each of its keys."""
        key_set = agent_pb2.TrustedKeys()
        key_set.CopyFrom(self._load()[2])
        return key_set

    def keys(self) -> tuple[int, list[SigningKeyRecord]]:
        """Return the key set version and the keys that are not retired, oldest first."""
        version, keys, _ = self._load()
        return version, list(keys)

    def rotate(self, now: datetime) -> SigningKeyRecord:
        """Add a new signing key that signs assignments from now on; return it.

        The new key set is signed by the old keys too, so agents that trust any of them accept it.
        """
        key = Ed25519PrivateKey.generate()
        public = _raw_public(key)
        record = SigningKeyRecord(
            key_id=key_id_of(public), public_key=public, private_key=_raw_private(key), created_at=now
        )
        version = self.store.add_signing_key(record)
        self.invalidate()
        log.info("added signing key %s; key set version %d", record.key_id, version)
        return record

    def retire(self, key_id: str, now: datetime) -> int:
        """Remove a key from the key set; return the new key set version.

        Raises FailedPrecondition for the newest key, which signs assignments (rotate first), and the
        store's NotFoundError for an unknown or retired key.
        """
        _, keys, _ = self._load()
        if keys and keys[-1].key_id == key_id:
            raise FailedPrecondition(
                f"signing key {key_id} signs new assignments; rotate to a new key (`edgefleet keys rotate`) first"
            )
        version = self.store.retire_signing_key(key_id, now)
        self.invalidate()
        log.info("retired signing key %s; key set version %d", key_id, version)
        return version

    def sign_desired_state(
        self, device_id: str, desired: agent_pb2.DesiredState, rollbacks: Mapping[str, str]
    ) -> agent_pb2.DesiredState:
        """Return a copy of desired with every assignment signed and the current key set attached.

        Each assignment's counter is the desired-state generation; rollbacks maps a model name to the
        digest that the operator deployed with the rollback flag. Raises FailedPrecondition when no
        signing key exists.
        """
        _, keys, key_set = self._load()
        if not keys:
            raise FailedPrecondition("no signing key exists; restart the orchestrator to create one")
        signing = keys[-1]
        private = Ed25519PrivateKey.from_private_bytes(signing.private_key)
        signed = agent_pb2.DesiredState()
        signed.CopyFrom(desired)
        for assignment in signed.models:
            assignment.version_counter = desired.generation
            assignment.rollback = rollbacks.get(assignment.model_name) == assignment.digest
            assignment.signing_key_id = signing.key_id
            assignment.signature = private.sign(assignment_payload(device_id, assignment))
        signed.trusted_keys.CopyFrom(key_set)
        return signed


def _signed_key_set(version: int, keys: list[SigningKeyRecord]) -> agent_pb2.TrustedKeys:
    key_set = agent_pb2.TrustedKeys(
        version=version, keys=[agent_pb2.SigningKey(key_id=k.key_id, public_key=k.public_key) for k in keys]
    )
    payload = key_set_payload(version, key_set.keys)
    for key in keys:
        signature = Ed25519PrivateKey.from_private_bytes(key.private_key).sign(payload)
        key_set.signatures.append(agent_pb2.KeySignature(key_id=key.key_id, signature=signature))
    return key_set
