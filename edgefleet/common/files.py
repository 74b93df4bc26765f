"""File-system helpers shared by the agent and the orchestrator."""

from __future__ import annotations

import errno
import grp
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


class SocketPathError(ValueError):
    """A Unix socket path that cannot be bound; the message names the path, the flag and the fix."""


# sun_path of struct sockaddr_un is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(path: Path, what: str, option: str) -> None:
    """Raise SocketPathError naming what and option when path is too long to bind as a Unix socket."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise SocketPathError(
            f"{what} path {path} is {length} bytes long, but a Unix socket path has at most "
            f"{MAX_SOCKET_PATH_BYTES}; set {option} or --state-dir to a shorter path"
        )


def claim_socket_path(path: Path, option: str, what: str = "socket") -> None:
    """Prepare path for binding a Unix socket: remove a socket that no process serves any more.

    Raises SocketPathError naming option when path is a socket that another process still accepts on, a
    directory or another file that is not a socket, so that a second agent or a mistyped path never takes
    over a file. what names the socket in the message, such as "tensor socket".
    """
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise SocketPathError(
            f"the {what} path {path} exists and is not a socket but a directory; set {option} to the path "
            "of the socket file, not of its directory"
        )
    if not path.is_socket():
        raise SocketPathError(
            f"the {what} path {path} exists and is not a socket; remove the file or set {option} to another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # Left behind by a process that was killed.
        return
    except OSError as error:
        raise SocketPathError(
            f"the {what} {path} exists, and connecting to it to check whether another process serves it "
            f"failed: {error.strerror}; stop the process that owns it, or remove it, or set {option} to "
            "another path"
        ) from error
    finally:
        probe.close()
    raise SocketPathError(
        f"another process serves the socket {path}, such as another agent with the same --state-dir; stop it "
        f"or set {option} to another path"
    )


def prepare_socket_path(path: Path, what: str, option: str) -> None:
    """Create the directory of path and check that this process can bind a Unix socket there.

    Removes a stale socket as claim_socket_path does, then binds a socket at path and removes it again,
    so that a directory without write access fails here with its reason. gRPC reports such a failure
    only as "Failed to bind". Raises SocketPathError naming what, path, option and the fix.
    """
    check_socket_path(path, what, option)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise SocketPathError(
            f"cannot create the directory {directory} of the {what} {path}: it or one of its parents is a "
            f"file; set {option} to a path in a directory"
        ) from error
    except OSError as error:
        raise SocketPathError(
            f"cannot create the directory {directory} of the {what} {path}: {error.strerror}; create it "
            f"with write access for uid {os.geteuid()}, or set {option} to a path in a writable directory"
        ) from error
    claim_socket_path(path, option, what)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(str(path))
    except OSError as error:
        raise SocketPathError(bind_error_message(error, path, what, option)) from error
    else:
        path.unlink(missing_ok=True)
    finally:
        probe.close()


def bind_error_message(error: OSError, path: Path, what: str, option: str) -> str:
    """Return why binding the Unix socket path failed with error, and the fix, for an error message."""
    if error.errno == errno.EADDRINUSE:
        return (
            f"another process created the {what} {path} while this one started; stop it or set {option} to another path"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot create the {what} {path}: the directory {path.parent} is not writable by uid "
            f"{os.geteuid()} ({error.strerror}); give that user write access to it, or set {option} to a path "
            "in a writable directory"
        )
    return f"cannot create the {what} {path}: {error.strerror or error}; set {option} to another path"


def access_group(path: Path) -> tuple[Path, str, int] | None:
    """Return the first of path and its parents whose status this user can read, its group and mode bits.

    A user denied access to a socket needs the group of the socket, or of the first directory above it
    that this user can read the status of, such as /run/edgefleet-agent (mode 0750) under the systemd
    unit. Returns None when no such entry is found.
    """
    for entry in (path, *path.parents):
        try:
            status = entry.stat()
        except OSError:
            continue
        try:
            group = grp.getgrgid(status.st_gid).gr_name
        except KeyError:
            group = str(status.st_gid)
        return entry, group, status.st_mode & 0o7777
    return None
