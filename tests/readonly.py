"""Run a command with a directory on a read-only file system, which even root cannot write to."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Mounts an empty read-only tmpfs on $1 in the new mount namespace, then runs the rest of the command.
_MOUNT_AND_RUN = 'mount -t tmpfs -o ro edgefleet-test "$1" && shift && exec "$@"'


def _unshare_args() -> list[str]:
    # Root gets a private mount namespace directly; other users need a user namespace as well.
    return ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["--map-root-user"])


@functools.cache
def read_only_mounts_work() -> str:
    """Return "" when this machine can run commands with a read-only mount, else the reason it cannot."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    with tempfile.TemporaryDirectory() as directory:
        probe = [*_unshare_args(), "sh", "-c", _MOUNT_AND_RUN, "sh", directory, "sh", "-c", f"! touch {directory}/x"]
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        return f"cannot mount a read-only tmpfs in a private mount namespace: {result.stderr.strip()}"
    return ""


def on_read_only_mount(directory: Path, command: list[str]) -> list[str]:
    """Return command wrapped so that directory is an empty read-only file system for it.

    The mount lives in a private mount namespace that ends with the command, so nothing is left
    behind. directory must exist.
    """
    return [*_unshare_args(), "sh", "-c", _MOUNT_AND_RUN, "sh", str(directory), *command]
