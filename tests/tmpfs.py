"""A small tmpfs mounted for a test, so that a test can fill a disk."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, options: str, *, lazy_unmount: bool = False) -> Iterator[Path]:
    """Mount a tmpfs with the given options on mount_point, yield it and unmount it; skip without root.

    lazy_unmount detaches the mount even while processes started by the test still hold files on it,
    and then does not fail the test when unmounting fails.
    """
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)]
    try:
        mounted = subprocess.run(command, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        mounted = False
    if not mounted:
        pytest.skip("needs a tmpfs mount (root) to fill a disk")
    try:
        yield mount_point
    finally:
        if lazy_unmount:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
        else:
            subprocess.run(["umount", str(mount_point)], check=True)
