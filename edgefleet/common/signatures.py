"""Canonical signed payloads of assignments and key sets, and Ed25519 verification, shared by both sides."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.v1 import agent_pb2

ASSIGNMENT_CONTEXT = b"edgefleet.v1.ModelAssignment\n"
KEY_SET_CONTEXT = b"edgefleet.v1.TrustedKeys\n"
PUBLIC_KEY_BYTES = 32


def key_id_of(public_key: bytes) -> str:
    """Return the id of a raw Ed25519 public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _canonical(context: bytes, value: object) -> bytes:
    # Sorted keys and no whitespace give one byte string per value, independent of protobuf encoding.
    return context + json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def assignment_payload(device_id: str, assignment: agent_pb2.ModelAssignment) -> bytes:
    """Return the bytes that an assignment's signature covers: device, artifact, metadata, counter, rollback.

    threads is left out: it tunes execution and changes no byte the device runs.
    """
    return _canonical(
        ASSIGNMENT_CONTEXT,
        {
            "device_id": device_id,
            "model_name": assignment.model_name,
            "model_version": assignment.model_version,
            "variant_id": assignment.variant_id,
            "digest": assignment.digest,
            "size_bytes": assignment.size_bytes,
            "format": int(assignment.format),
            "version_counter": assignment.version_counter,
            "rollback": assignment.rollback,
        },
    )


def key_set_payload(version: int, keys: Iterable[agent_pb2.SigningKey]) -> bytes:
    """Return the bytes that a key set's signatures cover: its version and its keys in key id order."""
    entries = sorted((key.key_id, key.public_key.hex()) for key in keys)
    return _canonical(KEY_SET_CONTEXT, {"version": version, "keys": entries})


def verify(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    """Return whether signature is a valid Ed25519 signature of payload by the raw public_key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except InvalidSignature:
        return False
    return True
