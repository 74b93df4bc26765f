"""File-system helpers shared by the agent and the orchestrator."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries to disk, so that a rename or unlink inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# sun_path of struct sockaddr_un is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(path: Path, what: str, option: str) -> None:
    """Raise ValueError naming what and option when path is too long to bind as a Unix socket."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"{what} path {path} is {length} bytes long, but a Unix socket path has at most "
            f"{MAX_SOCKET_PATH_BYTES}; set {option} or --state-dir to a shorter path"
        )


def claim_socket_path(path: Path, option: str) -> None:
    """Prepare path for binding a Unix socket: remove a socket that no process serves any more.

    Raises ValueError naming option when path is a socket that another process still accepts on, or a
    file that is not a socket, so that a second agent or a mistyped path never takes over a file.
    """
    if not os.path.lexists(path):
        return
    if not path.is_socket():
        raise ValueError(f"{path} exists and is not a socket; remove it or set {option} to another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # Left behind by a process that was killed.
        return
    finally:
        probe.close()
    raise ValueError(f"another process serves the socket {path}; stop it or set {option} to another path")
