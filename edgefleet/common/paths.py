"""Checks of the directories a daemon writes to, run at start-up so that a bad path is a clear error."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

_ACCESS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)


def writable_directory_problem(path: Path) -> str | None:
    """Create path and its parents when missing, then create and remove a file in it.

    Returns None when this process can write there, else what is wrong as a phrase that follows the
    path in a message ("exists but is not a directory", ...). Only a real write is correct for root,
    ACLs and read-only mounts. The file has no name or is unlinked at once, so a killed process
    leaves nothing behind. Errors other than a file in the way, a missing permission or
    a read-only file system (a full disk, an I/O error) are raised, since they are not about the path.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "exists but is not a directory"
    except NotADirectoryError:
        return "cannot be created: one of its parents is a file, not a directory"
    except OSError as error:
        if error.errno not in _ACCESS_ERRORS:
            raise
        return f"cannot be created: {error.strerror}"
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        if error.errno not in _ACCESS_ERRORS:
            raise
        return f"is not writable by uid {os.geteuid()}: {error.strerror}"
    return None
