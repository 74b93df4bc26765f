"""Signature and anti-rollback checks of assignments before a model is fetched and put into place."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path

from edgefleet.common.signatures import assignment_payload, key_id_of, key_set_payload, verify
from edgefleet.v1 import agent_pb2

log = logging.getLogger(__name__)

KEYS_FILE = "trusted_keys.json"
COUNTERS_FILE = "counters.json"


class VerificationError(Exception):
    """An assignment or key set failed verification; the message gives the reason and the fix."""


def key_set_ids(key_set: agent_pb2.TrustedKeys) -> str:
    """Return the ids of a key set's keys and of the keys that signed it, for log lines."""
    keys = ", ".join(sorted(key.key_id for key in key_set.keys)) or "none"
    signers = ", ".join(sorted(signature.key_id for signature in key_set.signatures)) or "none"
    return f"version {key_set.version} with keys {keys}, signed by {signers}"


def _write_json(path: Path, value: object) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _save_json(path: Path, value: object, description: str) -> None:
    """Write path like _write_json, but log a failure, such as a full disk, instead of raising.

    The caller has already updated its state in memory, and the agent keeps using it. Only a restart
    before the next successful save goes back to the file's older content.
    """
    try:
        _write_json(path, value)
    except OSError as error:
        with contextlib.suppress(OSError):
            path.with_suffix(".tmp").unlink(missing_ok=True)
        log.error(
            "cannot save %s to %s: %s; the agent keeps using it, but a restart before the next successful save "
            "reads the version saved before; free space in %s",
            description,
            path,
            error,
            path.parent,
        )


class ArtifactVerifier:
    """The device's trusted signing keys and its anti-rollback counter per model, kept in state_dir.

    The first key set comes with the first registration (over mutual TLS). A later set replaces it
    only when a key of the current set signed it and its version is higher, so keys rotate without
    a new enrollment. Thread-safe.
    """

    def __init__(self, state_dir: Path, device_id: str = "") -> None:
        self.state_dir = state_dir
        self.device_id = device_id  # The agent sets it once the orchestrator has confirmed the id.
        self._lock = threading.Lock()
        self.key_version = 0
        self.keys: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        keys_path = self.state_dir / KEYS_FILE
        counters_path = self.state_dir / COUNTERS_FILE
        try:
            if keys_path.exists():
                data = json.loads(keys_path.read_text())
                self.key_version = int(data["version"])
                self.keys = {str(k): bytes.fromhex(v) for k, v in data["keys"].items()}
            if counters_path.exists():
                self.counters = {str(k): int(v) for k, v in json.loads(counters_path.read_text()).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"cannot read the trusted keys or counters in {self.state_dir}: {error}; restore them from a "
                "backup, or delete both files and enroll the device again"
            ) from None

    @property
    def has_keys(self) -> bool:
        return bool(self.keys)

    def trusted_keys_report(self) -> agent_pb2.TrustedKeysReport | None:
        """Return the key set version and key ids this device trusts, or None while it trusts none."""
        with self._lock:
            if not self.keys:
                return None
            return agent_pb2.TrustedKeysReport(version=self.key_version, key_ids=sorted(self.keys))

    def update_keys(self, key_set: agent_pb2.TrustedKeys, *, first_use: bool = False) -> bool:
        """Adopt a newer key set; return whether the stored set changed.

        Without stored keys, a set is adopted only when first_use is set (it came with a registration).
        Otherwise it needs a higher version and a valid signature by a key the device trusts. Raises
        VerificationError for a newer set that no trusted key signed, or a set whose key ids do not
        match its keys.
        """
        if not key_set.keys:
            return False
        payload = key_set_payload(key_set.version, key_set.keys)
        offered = {key.key_id: bytes(key.public_key) for key in key_set.keys}
        if any(key_id_of(public) != key_id for key_id, public in offered.items()):
            raise VerificationError("a signing key's id does not match its public key; the key set is ignored")
        with self._lock:
            if self.keys:
                if key_set.version <= self.key_version:
                    return False
                trusted = self.keys
            elif first_use:
                # Trust on first use: the set must at least be signed by its own keys.
                trusted = offered
            else:
                raise VerificationError("no trusted signing keys yet; they arrive with the device's registration")
            if not any(
                signature.key_id in trusted and verify(trusted[signature.key_id], signature.signature, payload)
                for signature in key_set.signatures
            ):
                raise VerificationError(
                    f"key set version {key_set.version} is not signed by a key this device trusts "
                    f"({', '.join(sorted(self.keys)) or 'none'}); if its keys were all retired, stop the agent, delete "
                    f"{self.state_dir / KEYS_FILE} and start it with a new enrollment token (none is needed when the "
                    "orchestrator runs with --insecure)"
                )
            self.keys = offered
            self.key_version = key_set.version
            _save_json(
                self.state_dir / KEYS_FILE,
                {"version": self.key_version, "keys": {k: v.hex() for k, v in offered.items()}},
                f"trusted key set version {self.key_version}",
            )
        log.info("trusting signing keys %s (key set version %d)", ", ".join(sorted(offered)), key_set.version)
        return True

    def check(self, assignment: agent_pb2.ModelAssignment) -> None:
        """Verify an assignment's signature and counter; raise VerificationError when it must not be installed."""
        name = assignment.model_name
        if not assignment.signature:
            raise VerificationError(f"assignment of {name} {assignment.variant_id} is not signed; it was rejected")
        with self._lock:
            public = self.keys.get(assignment.signing_key_id)
            running = self.counters.get(name, 0)
        if public is None:
            raise VerificationError(
                f"assignment of {name} {assignment.variant_id} is signed by unknown key "
                f"{assignment.signing_key_id!r} (trusted: {', '.join(sorted(self.keys)) or 'none'}); it was rejected. "
                "If the orchestrator's signing keys were replaced (a rotation this device missed, or a new "
                f"orchestrator database), delete {self.state_dir / KEYS_FILE} and enroll the device again with a new "
                f"token (edgefleet enroll create --device-id {self.device_id or 'DEVICE_ID'}; none is needed when the "
                "orchestrator runs with --insecure)"
            )
        if not verify(public, assignment.signature, assignment_payload(self.device_id, assignment)):
            raise VerificationError(
                f"signature of the assignment of {name} {assignment.variant_id} ({assignment.digest}) is invalid: "
                "the assignment was altered or signed for another device; it was rejected"
            )
        if assignment.version_counter < running and not assignment.rollback:
            raise VerificationError(
                f"assignment of {name} {assignment.variant_id} has counter {assignment.version_counter}, lower than "
                f"{running} of the running model: a replayed or outdated assignment; it was rejected "
                "(an operator can order a rollback with `edgefleet deploy --rollback`)"
            )

    def clear_counters(self, device_id: str) -> None:
        """Drop the counters of another device id, because the orchestrator assigned this agent a new one.

        Signatures bind the device id, so no assignment signed for the former id verifies for the new
        one, and the new id's generations, which are its counters, start again at 1.
        """
        with self._lock:
            if not self.counters:
                return
            dropped = self.counters
            self.counters = {}
            _save_json(
                self.state_dir / COUNTERS_FILE, self.counters, f"the cleared anti-rollback counters of {device_id}"
            )
        log.info(
            "cleared the anti-rollback counters of models %s, which belong to a former device id; now device_id=%s",
            ", ".join(sorted(dropped)),
            device_id,
        )

    def accept(self, assignment: agent_pb2.ModelAssignment) -> None:
        """Record the counter of an assignment that now runs; a rollback may lower it."""
        with self._lock:
            running = self.counters.get(assignment.model_name)
            if running == assignment.version_counter or (
                running is not None and assignment.version_counter < running and not assignment.rollback
            ):
                return
            self.counters[assignment.model_name] = assignment.version_counter
            _save_json(
                self.state_dir / COUNTERS_FILE,
                self.counters,
                f"anti-rollback counter {assignment.version_counter} of model {assignment.model_name}",
            )
