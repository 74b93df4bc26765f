"""The device's stable identity: its id and a secret instance key, kept in the state directory."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgefleet.common.paths import writable_directory_problem

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
LOCK_FILE = "agent.lock"


class IdentityError(ValueError):
    """The identity file exists but cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Identity:
    device_id: str  # Empty until the orchestrator assigns one at the first registration.
    instance_key: str  # Random secret; a second agent claiming this device id lacks it.


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state directory if it is missing and check that this process can create files in it.

    Raises IdentityError naming the directory and the fix when the path or one of its parents is not a
    directory, or when the directory cannot be created or written.
    """
    problem = writable_directory_problem(state_dir)
    if problem is not None:
        raise IdentityError(
            f"the state directory {state_dir} {problem}; set --state-dir to a directory that the agent's user "
            "can write, or make this one writable for that user (chown or chmod)"
        )


def load_identity(state_dir: Path) -> Identity:
    """Read the stored identity, creating a new instance key on first start."""
    path = state_dir / IDENTITY_FILE
    if not path.exists():
        identity = Identity(device_id="", instance_key=secrets.token_urlsafe(32))
        save_identity(state_dir, identity)
        log.info("created a new instance key in %s", path)
        return identity
    try:
        data = json.loads(path.read_text())
        identity = Identity(device_id=str(data.get("device_id", "")), instance_key=str(data["instance_key"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IdentityError(
            f"cannot read the device identity {path}: {error}; restore it from a backup, or delete it to "
            "register as a new device"
        ) from None
    if len(identity.instance_key) < 16:
        raise IdentityError(f"instance_key in {path} is too short; delete the file to register as a new device")
    return identity


def save_identity(state_dir: Path, identity: Identity) -> None:
    """Write the identity atomically with owner-only permissions."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / IDENTITY_FILE
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"device_id": identity.device_id, "instance_key": identity.instance_key}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def lock_state_dir(state_dir: Path) -> int:
    """Take an exclusive lock on the state directory and return the lock's file descriptor.

    Two agents on one state directory would share an identity and take each other's control stream
    and local socket. The lock is released when the descriptor is closed or the process ends. Raises
    IdentityError when another agent, in this process or another, holds the lock, or when the lock file
    cannot be opened.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise IdentityError(
            f"cannot open the lock file {path}: {error.strerror}; it must be a file that the agent's user "
            f"(uid {os.geteuid()}) can write, so remove it or fix its owner, or pass another --state-dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IdentityError(
            f"another agent is running with the state directory {state_dir} (it has locked {path}); "
            "stop that agent or give this one another --state-dir"
        ) from None
    return fd
