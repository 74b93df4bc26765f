"""File access for the hardware probe: every path is read below a root, and failures become None."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def under(root: Path, path: str | Path) -> Path:
    """Return the absolute path `path` relocated below `root` (for tests that use a fake tree)."""
    relative = str(path).lstrip("/")
    return root / relative if relative else root


def read_text(root: Path, path: str | Path) -> str | None:
    """Read a text file below root.

    Returns the contents, or None (and logs at debug level) when the file is missing, unreadable
    or not UTF-8.
    """
    target = under(root, path)
    try:
        return target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        logger.debug("cannot read %s: %s", target, exc)
        return None


def read_first_line(root: Path, path: str | Path) -> str | None:
    """Read the first line of a text file below root, stripped; None when the file cannot be read."""
    text = read_text(root, path)
    if text is None:
        return None
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def read_int(root: Path, path: str | Path, base: int = 10) -> int | None:
    """Read a file below root that contains one integer; None when it is missing or not an integer."""
    line = read_first_line(root, path)
    if line is None:
        return None
    try:
        return int(line, base)
    except ValueError:
        logger.debug("%s does not hold an integer: %r", under(root, path), line)
        return None


def link_name(path: Path) -> str:
    """Return the last component of a symlink's target (a driver or a PCI address), or "" if unset."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def list_dir(path: Path) -> list[Path]:
    """List a directory sorted by name; an empty list when it is missing or unreadable."""
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        logger.debug("cannot list %s: %s", path, exc)
        return []
