"""File cache for demo assets: atomic writes, a sha256 sidecar per file and a lock per file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "EDGEFLEET_CACHE"
SIDECAR_SUFFIX = ".json"
_PARTIAL_SUFFIX = ".partial"
_CHUNK_BYTES = 1 << 20
# mkstemp creates files readable by the owner only, but cached models are shared with other users.
_FILE_MODE = 0o644


class AssetError(RuntimeError):
    """A demo asset could not be built, downloaded or validated."""


@dataclass(frozen=True)
class CachedFile:
    """A validated cache entry: the file, its size in bytes and its sha256 hex digest."""

    path: Path
    size: int
    sha256: str


def default_cache_dir() -> Path:
    """Return `$EDGEFLEET_CACHE`, else `<repo>/.cache/edgefleet` in a source checkout, else the user cache.

    The user cache is `$XDG_CACHE_HOME/edgefleet` or `~/.cache/edgefleet`. It is used when the package is
    installed outside a checkout, so that nothing is written into site-packages.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "edgefleet"
    user_cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(user_cache) / "edgefleet"


def resolve_cache_dir(cache_dir: Path | str | None) -> Path:
    """Return `cache_dir` as a Path, or `default_cache_dir()` when it is None."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir)


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of the file at `path`."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    """Return the path of the JSON sidecar that records the size, sha256 and recipe of `path`."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def validate(path: Path, recipe: str, expected_sha256: str | None = None) -> CachedFile | None:
    """Check a cache entry against its sidecar (and a pinned digest if given).

    Returns the entry, or None when the file or sidecar is missing, was built by another recipe, or its
    size or sha256 differs from the sidecar or from `expected_sha256`. The whole file is hashed on every
    call (about 20 ms for 20 MB), so a corrupted file is always caught.
    """
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("recipe") != recipe or record.get("size") != size:
        return None
    digest = sha256_file(path)
    if record.get("sha256") != digest:
        logger.warning("cached file %s does not match its recorded sha256; rebuilding it", path)
        return None
    if expected_sha256 is not None and digest != expected_sha256:
        logger.warning("cached file %s has sha256 %s, not %s; rebuilding it", path, digest, expected_sha256)
        return None
    return CachedFile(path=path, size=size, sha256=digest)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # An advisory lock next to the entry serialises builders in concurrent processes (tests, make install).
    lock_path = path.with_name(f".{path.name}.lock")
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
    temp_path = Path(temp_name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        temp_path.chmod(_FILE_MODE)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def _remove_partials(path: Path) -> None:
    # Removes the leftovers of a killed builder. Callers hold the lock of the entry.
    for leftover in path.parent.glob(f".{path.name}.*{_PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def ensure_file(
    path: Path,
    recipe: str,
    build: Callable[[Path], None],
    expected_sha256: str | None = None,
) -> CachedFile:
    """Return the valid cache entry at `path`, building it first when it is missing, stale or corrupted.

    `build` writes the file to the temporary path it is given. The result is fsynced and renamed onto
    `path`, then the sidecar is written the same way, so an interrupted build leaves no entry that
    `validate` accepts. `recipe` names how the file is made; a sidecar with another recipe forces a
    rebuild. Raises AssetError when the built file does not match `expected_sha256`; errors raised by
    `build` propagate unchanged.
    """
    cached = validate(path, recipe, expected_sha256)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        # Another process may have built the entry while this one waited for the lock.
        cached = validate(path, recipe, expected_sha256)
        if cached is not None:
            return cached
        _remove_partials(path)
        logger.info("building %s", path)
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
        os.close(descriptor)
        temp_path = Path(temp_name)
        try:
            build(temp_path)
            digest = sha256_file(temp_path)
            if expected_sha256 is not None and digest != expected_sha256:
                raise AssetError(
                    f"built {path.name} has sha256 {digest}, expected {expected_sha256}; "
                    "the source package may have changed, so check its pinned version"
                )
            size = temp_path.stat().st_size
            with temp_path.open("rb") as stream:
                os.fsync(stream.fileno())
            temp_path.chmod(_FILE_MODE)
            sidecar_path(path).unlink(missing_ok=True)
            os.replace(temp_path, path)
        finally:
            temp_path.unlink(missing_ok=True)
        record = {"recipe": recipe, "size": size, "sha256": digest}
        _write_atomically(sidecar_path(path), (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        logger.info("cached %s (%d bytes, sha256 %s)", path, size, digest)
        return CachedFile(path=path, size=size, sha256=digest)
