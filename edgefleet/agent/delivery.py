"""On-device model store and the resumable, verified download of model artifacts from the orchestrator."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from edgefleet.common.errors import without_error_id
from edgefleet.common.files import fsync_directory
from edgefleet.common.logs import RetryLog
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

logger = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256:"
MODEL_EXTENSIONS = {"onnx": ".onnx", "tflite": ".tflite"}
# Each time this many bytes have arrived, a background thread fsyncs the .part file and records its
# verified offset while the download goes on. The next one starts only after the previous one is done,
# and the last one runs at the end. So a crash loses the bytes since the last completed record: about
# this much, more only where the storage writes slower than the network delivers.
DEFAULT_FSYNC_INTERVAL_BYTES = 8 * 1024 * 1024
DEFAULT_PARTIAL_MAX_AGE_S = 7 * 24 * 3600.0
STATE_FILE = "state.json"

# Status codes after which a download is tried again from the last verified offset. The others
# (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED and so on) will not change by retrying.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_READ_BUFFER_BYTES = 1024 * 1024

ProgressCallback = Callable[[int, int], None]


class DeliveryError(Exception):
    """A model could not be downloaded or installed."""

    # True when the same download may succeed later without a new assignment, so the agent tries it
    # again after a delay, and when it next connects to the orchestrator.
    retryable = False


class DigestMismatchError(DeliveryError):
    """The downloaded file's SHA-256 differs from the requested digest; it was deleted, not installed."""


class ChunkCorruptError(DeliveryError):
    """A chunk failed its SHA-256 check more often than the retry policy allows."""


class DiskFullError(DeliveryError):
    """The device's disk has no space for the download; the installed models are untouched."""

    retryable = True


class DownloadFailedError(DeliveryError):
    """The orchestrator rejected the download, or it kept failing after all retries."""


class DownloadInterruptedError(DownloadFailedError):
    """A download that kept failing with retryable status codes. Its verified part is kept for a later resume."""

    retryable = True

    def __init__(self, message: str, *, repeated: bool = False) -> None:
        super().__init__(message)
        # True when every attempt failed as the previous ones of this digest did, so none was logged
        # above debug level.
        self.repeated = repeated


class DownloadCancelledError(DeliveryError):
    """The caller's cancel event was set; the verified part is kept for a later resume."""


def parse_digest(digest: str) -> str:
    """Return the lowercase hex part of a "sha256:<hex>" digest. Raises ValueError when it is malformed."""
    hex_digest = digest[len(DIGEST_PREFIX) :].lower() if digest.startswith(DIGEST_PREFIX) else ""
    if not _HEX_DIGEST.fullmatch(hex_digest):
        raise ValueError(f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    return hex_digest


def _is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class InstalledModel:
    name: str
    digest: str  # "sha256:<hex>".
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class PartialDownload:
    """The sidecar record of a .part file: its first verified_offset bytes are durable and verified."""

    digest: str
    total_size: int
    verified_offset: int


class ModelStore:
    """Model files on the device, with the current and the previous version of each model.

    Layout under root:
      models/<name>/<hex>.<ext>   verified, complete files; at most the current and the previous one
      models/<name>/state.json    {"current": file name, "previous": file name or null}
      partial/<hex>.part          a download in progress; partial/<hex>.json records its verified offset
      tmp/                        temporary files, renamed into place once complete

    A file reaches models/ only by a rename after its SHA-256 checked out, so models/ never contains a
    partial file. Construction removes leftovers: temporary files, .part files not written for
    partial_max_age_s, partials of digests outside desired_digests (when given) and model files that
    no state.json refers to. One agent process owns a root; threads may share one ModelStore.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        partial_max_age_s: float = DEFAULT_PARTIAL_MAX_AGE_S,
        desired_digests: Iterable[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.partial_dir = self.root / "partial"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.models_dir, self.partial_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._digest_locks: dict[str, threading.Lock] = {}
        self._remove_leftovers(partial_max_age_s, desired_digests)

    # Partial downloads.

    def part_path(self, digest: str) -> Path:
        """Return the path of a digest's .part file. Raises ValueError for a malformed digest."""
        return self.partial_dir / f"{parse_digest(digest)}.part"

    def _sidecar_path(self, digest: str) -> Path:
        return self.partial_dir / f"{parse_digest(digest)}.json"

    def digest_lock(self, digest: str) -> threading.Lock:
        """Return the lock that serializes downloads of one digest within this process."""
        with self._lock:
            return self._digest_locks.setdefault(parse_digest(digest), threading.Lock())

    def read_partial(self, digest: str) -> PartialDownload | None:
        """Return the resumable state of a digest's download, or None when there is none to trust."""
        part = self.part_path(digest)
        try:
            record = json.loads(self._sidecar_path(digest).read_text())
            state = PartialDownload(
                digest=str(record["digest"]),
                total_size=int(record["total_size"]),
                verified_offset=int(record["verified_offset"]),
            )
            part_size = part.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if state.digest != digest or not 0 <= state.verified_offset <= min(state.total_size, part_size):
            logger.warning("ignoring inconsistent partial download record for %s: %s", digest, state)
            return None
        return state

    def write_partial(self, state: PartialDownload) -> None:
        """Record a verified offset atomically; the caller fsyncs the .part file first."""
        record = {
            "digest": state.digest,
            "total_size": state.total_size,
            "verified_offset": state.verified_offset,
        }
        self._write_atomically(self._sidecar_path(state.digest), json.dumps(record).encode(), sync_dir=False)

    def open_partial(self, digest: str, offset: int) -> BinaryIO:
        """Open a digest's .part file for appending at offset; bytes after offset are cut off."""
        fd = os.open(self.part_path(digest), os.O_RDWR | os.O_CREAT, 0o644)
        handle = os.fdopen(fd, "r+b")
        try:
            handle.truncate(offset)
            handle.seek(offset)
        except BaseException:
            handle.close()
            raise
        return handle

    def discard_partial(self, digest: str) -> None:
        """Delete a digest's .part file and its record."""
        self.part_path(digest).unlink(missing_ok=True)
        self._sidecar_path(digest).unlink(missing_ok=True)

    def discard_partials_except(self, desired_digests: Iterable[str]) -> int:
        """Delete partial downloads whose digest is not in desired_digests; return how many were deleted."""
        keep = {parse_digest(digest) for digest in desired_digests}
        removed = 0
        for entry in list(self.partial_dir.iterdir()):
            if entry.stem not in keep:
                entry.unlink(missing_ok=True)
                removed += entry.suffix == ".part"
        if removed:
            logger.info("removed %d partial downloads that are not in the desired state", removed)
        return removed

    # Installed models.

    def current(self, name: str) -> InstalledModel | None:
        """Return the model version in use, or None when none is installed."""
        with self._lock:
            return self._installed(name, self._read_state(name).get("current"))

    def previous(self, name: str) -> InstalledModel | None:
        """Return the version kept for rollback, or None."""
        with self._lock:
            return self._installed(name, self._read_state(name).get("previous"))

    def find(self, name: str, digest: str) -> InstalledModel | None:
        """Return the current or previous version of name with this digest, or None."""
        hex_digest = parse_digest(digest)
        for model in (self.current(name), self.previous(name)):
            if model is not None and model.path.stem == hex_digest:
                return model
        return None

    def find_verified(self, name: str, digest: str) -> InstalledModel | None:
        """Return what find() returns once the file's SHA-256 matches digest, or None.

        The check covers files changed on disk after their download, for example by someone with access
        to the device, before they are loaded again. A file that fails it is deleted and logged, so the
        next download replaces it.
        """
        model = self.find(name, digest)
        if model is None:
            return None
        try:
            with model.path.open("rb") as handle:
                actual = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as error:
            logger.error("cannot read model file %s to check its SHA-256: %s", model.path, error)
            return None
        if actual == parse_digest(digest):
            return model
        logger.error(
            "model file %s has SHA-256 %s, not %s: it changed after its download; deleted it, and the "
            "model is downloaded again",
            model.path,
            actual,
            digest,
        )
        model.path.unlink(missing_ok=True)
        return None

    def install(self, name: str, digest: str, source: Path, model_format: str) -> InstalledModel:
        """Move a verified file into models/<name>/ and make it the current version.

        The former current version becomes the previous one, and older versions are deleted. source
        must be on the same file system (the partial/ directory is). Raises ValueError for a bad
        name, digest or format, DiskFullError when the state cannot be written (the former current
        version then stays current).
        """
        _check_model_name(name)
        hex_digest = parse_digest(digest)
        extension = MODEL_EXTENSIONS.get(model_format)
        if extension is None:
            raise ValueError(f"unsupported model format {model_format!r}; expected one of {sorted(MODEL_EXTENSIONS)}")
        with self._lock:
            directory = self.models_dir / name
            directory.mkdir(exist_ok=True)
            target = directory / f"{hex_digest}{extension}"
            state = self._read_state(name)
            referenced = {state.get("current"), state.get("previous")}
            if target.exists():
                Path(source).unlink(missing_ok=True)
            else:
                self._move_into_place(Path(source), target, name, digest)

            old_current = state.get("current")
            new_state = {
                "current": target.name,
                "previous": old_current if old_current != target.name else state.get("previous"),
            }
            try:
                self._write_state(name, new_state)
            except OSError as error:
                if target.name not in referenced:
                    target.unlink(missing_ok=True)
                if _is_disk_full(error):
                    raise DiskFullError(
                        f"disk full while installing {name} {digest}; the installed version is unchanged, "
                        f"free space under {self.root}"
                    ) from error
                raise
            self._sidecar_path(digest).unlink(missing_ok=True)
            self._prune(name, new_state)
            logger.info("installed model %s %s (previous: %s)", name, digest, new_state["previous"])
            installed = self._installed(name, target.name)
            assert installed is not None
            return installed

    def _move_into_place(self, source: Path, target: Path, name: str, digest: str) -> None:
        try:
            with source.open("rb") as handle:
                os.fsync(handle.fileno())
            os.rename(source, target)
            fsync_directory(target.parent)
        except OSError as error:
            if _is_disk_full(error):
                raise DiskFullError(
                    f"disk full while installing {name} {digest}; the installed version is unchanged, "
                    f"free space under {self.root}"
                ) from error
            raise

    def activate(self, name: str, digest: str) -> InstalledModel:
        """Make an installed version (current or previous) current again. Raises LookupError if absent."""
        with self._lock:
            model = self.find(name, digest)
            if model is None:
                raise LookupError(f"model {name} {digest} is not installed; download it first")
            state = self._read_state(name)
            if state.get("current") != model.path.name:
                self._write_state(name, {"current": model.path.name, "previous": state.get("current")})
            return model

    def rollback(self, name: str) -> InstalledModel:
        """Make the previous version current and delete the abandoned one; return the restored version.

        Raises LookupError when no previous version is kept.
        """
        with self._lock:
            state = self._read_state(name)
            restored = self._installed(name, state.get("previous"))
            if restored is None:
                raise LookupError(f"model {name} has no previous version to roll back to")
            new_state = {"current": restored.path.name, "previous": None}
            self._write_state(name, new_state)
            self._prune(name, new_state)
            logger.info("rolled model %s back to %s", name, restored.digest)
            return restored

    def remove(self, name: str) -> None:
        """Delete every version of a model."""
        _check_model_name(name)
        with self._lock:
            shutil.rmtree(self.models_dir / name, ignore_errors=True)

    def _installed(self, name: str, file_name: object) -> InstalledModel | None:
        if not isinstance(file_name, str):
            return None
        path = self.models_dir / name / file_name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return InstalledModel(name=name, digest=DIGEST_PREFIX + path.stem, path=path, size_bytes=size)

    def _read_state(self, name: str) -> dict[str, str | None]:
        _check_model_name(name)
        try:
            record = json.loads((self.models_dir / name / STATE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        if not isinstance(record, dict):
            return {}
        return {key: value for key, value in record.items() if isinstance(value, str)}

    def _write_state(self, name: str, state: dict[str, str | None]) -> None:
        self._write_atomically(self.models_dir / name / STATE_FILE, json.dumps(state).encode(), sync_dir=True)

    def _prune(self, name: str, state: dict[str, str | None]) -> None:
        keep = {STATE_FILE, state.get("current"), state.get("previous")}
        for entry in (self.models_dir / name).iterdir():
            if entry.name not in keep:
                entry.unlink(missing_ok=True)
                logger.info("deleted old version %s of model %s", entry.name, name)

    def _write_atomically(self, path: Path, data: bytes, *, sync_dir: bool) -> None:
        temp = self.tmp_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            with temp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        if sync_dir:
            fsync_directory(path.parent)

    # Start-up cleanup.

    def _remove_leftovers(self, partial_max_age_s: float, desired_digests: Iterable[str] | None) -> None:
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self._remove_stale_partials(partial_max_age_s)
        if desired_digests is not None:
            self.discard_partials_except(desired_digests)
        for directory in self.models_dir.iterdir():
            if not directory.is_dir() or not _MODEL_NAME.fullmatch(directory.name):
                logger.warning("removing unexpected entry %s from the model store", directory)
                _remove_path(directory)
                continue
            state = self._read_state(directory.name)
            if not state:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                self._prune(directory.name, state)

    def _remove_stale_partials(self, max_age_s: float) -> None:
        now = time.time()
        groups: dict[str, list[Path]] = {}
        for entry in self.partial_dir.iterdir():
            groups.setdefault(entry.stem, []).append(entry)
        for stem, entries in groups.items():
            suffixes = sorted(entry.suffix for entry in entries)
            newest = max(entry.stat().st_mtime for entry in entries)
            complete_pair = suffixes == [".json", ".part"] and _HEX_DIGEST.fullmatch(stem) is not None
            if complete_pair and now - newest <= max_age_s:
                continue
            for entry in entries:
                _remove_path(entry)
            logger.info("removed stale or orphaned partial download %s", stem)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _check_model_name(name: str) -> None:
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1 to 128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8  # Consecutive failed attempts without progress before giving up.
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_chunk_refetches: int = 3  # Corrupt copies of one chunk tolerated before giving up.

    def backoff_s(self, failures: int, rng: random.Random) -> float:
        """Return a full-jitter delay: uniform in [0, min(max, initial * 2 ** (failures - 1))]."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(failures - 1, 0))
        return rng.uniform(0.0, ceiling)


class _CorruptChunk(Exception):
    """The current stream delivered a chunk that failed verification; fetch again from the offset."""


class Downloader:
    """Fetches artifacts by digest over DownloadArtifact and installs them into a ModelStore.

    Uses the synchronous gRPC API; run it in a worker thread. Every chunk's SHA-256 is checked and
    a corrupt chunk is fetched again. A broken stream resumes from the last verified offset after a
    capped exponential backoff with full jitter, and a restarted agent resumes from the offset last
    recorded on disk (see DEFAULT_FSYNC_INTERVAL_BYTES).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        store: ModelStore,
        *,
        device_id: str = "",
        chunk_size: int = 0,
        retry: RetryPolicy | None = None,
        fsync_interval_bytes: int = DEFAULT_FSYNC_INTERVAL_BYTES,
        attempt_timeout_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.store = store
        self.device_id = device_id
        self.chunk_size = chunk_size  # 0 uses the server's default.
        self.retry = retry or RetryPolicy()
        self.fsync_interval_bytes = fsync_interval_bytes
        self.attempt_timeout_s = attempt_timeout_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        # Failed attempts per digest, so a download that fails the same way in every retry round
        # logs its attempts at debug level, with a warning at most every 5 minutes.
        self.failures = RetryLog(logger)

    def install(
        self,
        name: str,
        digest: str,
        model_format: str,
        *,
        expected_size: int = 0,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> InstalledModel:
        """Make (name, digest) the current version of a model, downloading it unless it is installed.

        Returns the installed model. Raises the errors of fetch and ModelStore.install.
        """
        if self.store.find_verified(name, digest) is not None:
            return self.store.activate(name, digest)
        path = self.fetch(digest, expected_size=expected_size, progress=progress, cancel=cancel)
        return self.store.install(name, digest, path, model_format)

    def fetch(
        self,
        digest: str,
        *,
        expected_size: int = 0,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Download an artifact into its .part file, resuming a partial download, and verify it.

        Returns the path of the complete file, flushed to disk and matching digest. expected_size
        (0 if unknown) is checked against the server's total size. progress receives
        (bytes_done, total) after every chunk. Raises DigestMismatchError (the file is deleted),
        ChunkCorruptError, DiskFullError (the partial file is deleted to free space),
        DownloadFailedError, DownloadCancelledError, and ValueError for a malformed digest.
        """
        hex_digest = parse_digest(digest)
        with self.store.digest_lock(digest):
            state = self.store.read_partial(digest)
            offset = state.verified_offset if state is not None else 0
            total = state.total_size if state is not None else expected_size
            if expected_size and total != expected_size:
                offset, total = 0, expected_size
            if offset:
                logger.info("resuming download of %s at byte %d of %d", digest, offset, total)
            try:
                handle = self.store.open_partial(digest, offset)
            except OSError as error:
                if _is_disk_full(error):
                    raise self._disk_full(digest, error) from error
                raise
            transfer = _Transfer(self, digest, handle, offset, total, progress, cancel)
            try:
                transfer.hash_existing_prefix()
                transfer.run()
                actual = transfer.finish()
            except OSError as error:
                transfer.close_quietly()
                if _is_disk_full(error):
                    self.store.discard_partial(digest)
                    raise self._disk_full(digest, error) from error
                raise
            except BaseException:
                transfer.close_quietly()
                raise
            if actual != hex_digest:
                self.store.discard_partial(digest)
                raise DigestMismatchError(
                    f"downloaded file has SHA-256 {actual}, not the requested {digest}; it was deleted. "
                    "The orchestrator's stored artifact may be corrupt: upload the model again"
                )
            self.failures.succeeded(digest, f"download of {digest}")
            return self.store.part_path(digest)

    def _disk_full(self, digest: str, error: OSError) -> DiskFullError:
        free = shutil.disk_usage(self.store.root).free
        return DiskFullError(
            f"disk full while downloading {digest} ({free} bytes free under {self.store.root}): {error}; "
            "installed models are unchanged; free space on the device, and the agent tries the download "
            "again by itself"
        )


class _BackgroundSync:
    """One fsync of the .part file and the record of its verified offset, run in a thread of its own."""

    def __init__(self, fd: int, store: ModelStore, state: PartialDownload) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fd, store, state), name="edgefleet-fsync", daemon=True)
        self.thread.start()

    def _run(self, fd: int, store: ModelStore, state: PartialDownload) -> None:
        try:
            os.fsync(fd)
            store.write_partial(state)
        except BaseException as error:  # Raised again in the download thread by wait().
            self.error = error

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> None:
        """Wait for the sync to end; raise its error, if any."""
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Transfer:
    """The state of one fetch: the open .part file, the verified offset and the running SHA-256.

    The file descriptor stays open while a background sync uses it: every path that closes the
    handle or syncs it in the download thread first waits for that sync.
    """

    def __init__(
        self,
        downloader: Downloader,
        digest: str,
        handle: BinaryIO,
        offset: int,
        total: int,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> None:
        self.downloader = downloader
        self.store = downloader.store
        self.digest = digest
        self.handle = handle
        self.offset = offset
        self.total = total  # 0 until the server reports it, unless known from the record or the caller.
        self.total_known = total > 0
        self.progress = progress
        self.cancel = cancel
        self.hash = hashlib.sha256()
        self.unsynced_bytes = 0
        self.refetches: dict[int, int] = {}
        self.sync: _BackgroundSync | None = None
        self.logged = False  # Whether a failed attempt of this fetch was logged above debug level.

    def hash_existing_prefix(self) -> None:
        """Feed the already verified bytes of a resumed .part file into the running SHA-256."""
        remaining = self.offset
        self.handle.seek(0)
        while remaining:
            block = self.handle.read(min(_READ_BUFFER_BYTES, remaining))
            if not block:
                raise OSError(f"{self.store.part_path(self.digest)} is shorter than its recorded offset")
            self.hash.update(block)
            remaining -= len(block)
        self.handle.seek(self.offset)

    def run(self) -> None:
        """Stream chunks until the whole artifact is on disk, resuming after failures by the retry policy."""
        policy = self.downloader.retry
        failures = 0
        if self.total_known:
            self._check_free_space()
        while not (self.total_known and self.offset >= self.total):
            if self.cancel is not None and self.cancel.is_set():
                self.checkpoint()
                raise DownloadCancelledError(f"download of {self.digest} cancelled at byte {self.offset}")
            start = self.offset
            try:
                self._stream_once()
                if self.total_known and self.offset >= self.total:
                    break
                if self.cancel is not None and self.cancel.is_set():
                    continue  # _stream_once stopped for the cancel, which the check at the top of the loop raises.
                reason = f"stream ended at byte {self.offset} of {self.total}"
            except _CorruptChunk as corrupt:
                count = self.refetches.get(self.offset, 0) + 1
                self.refetches[self.offset] = count
                if count > policy.max_chunk_refetches:
                    self.checkpoint()
                    raise ChunkCorruptError(
                        f"chunk at byte {self.offset} of {self.digest} failed verification {count} times: "
                        f"{corrupt}; check the network path and the orchestrator's storage"
                    ) from None
                logger.warning("fetching chunk at byte %d of %s again: %s", self.offset, self.digest, corrupt)
                continue
            except grpc.RpcError as error:
                if self.cancel is not None and self.cancel.is_set():
                    # The agent stops and closed the channel under the call: a cancel, not a failure.
                    self.checkpoint()
                    raise DownloadCancelledError(f"download of {self.digest} cancelled at byte {self.offset}") from None
                code = error.code()
                if code not in RETRYABLE_CODES:
                    self.checkpoint()
                    raise DownloadFailedError(
                        f"orchestrator rejected the download of {self.digest}: {code.name}: {error.details()}"
                    ) from None
                reason = f"{code.name}: {error.details()}"
            if self.offset > start:
                failures = 0
            failures += 1
            comparable_reason = without_error_id(reason)
            if failures > policy.max_attempts:
                self.logged |= self.downloader.failures.failed(
                    self.digest,
                    comparable_reason,
                    "download of %s interrupted at byte %d (%s); giving up after %d attempts in a row",
                    self.digest,
                    self.offset,
                    reason,
                    failures,
                )
                self.checkpoint()
                raise DownloadInterruptedError(
                    f"download of {self.digest} failed {failures} times in a row at byte {self.offset} "
                    f"({reason}); the agent resumes it from this offset after a wait, or when it next connects",
                    repeated=not self.logged,
                )
            delay = policy.backoff_s(failures, self.downloader._rng)
            self.logged |= self.downloader.failures.failed(
                self.digest,
                comparable_reason,
                "download of %s interrupted at byte %d (%s); retry %d in %.2f s",
                self.digest,
                self.offset,
                reason,
                failures,
                delay,
            )
            if self.cancel is None:
                self.downloader._sleep(delay)
            else:
                self.cancel.wait(delay)  # A cancel ends the wait early, and the check above raises.

    def _stream_once(self) -> None:
        request = agent_pb2.DownloadArtifactRequest(
            device_id=self.downloader.device_id,
            digest=self.digest,
            offset=self.offset,
            chunk_size=self.downloader.chunk_size,
        )
        call = self.downloader._stub.DownloadArtifact(request, timeout=self.downloader.attempt_timeout_s)
        try:
            for chunk in call:
                self._accept(chunk)
                if self.total_known and self.offset >= self.total:
                    return
                if self.cancel is not None and self.cancel.is_set():
                    return
        finally:
            call.cancel()

    def _accept(self, chunk: agent_pb2.ArtifactChunk) -> None:
        data = chunk.data  # Each read of a bytes field copies it out of the message.
        if chunk.offset != self.offset:
            raise _CorruptChunk(f"chunk has offset {chunk.offset}, expected {self.offset}")
        if self.total_known and chunk.total_size != self.total:
            raise DownloadFailedError(
                f"orchestrator reports {chunk.total_size} bytes for {self.digest}, expected {self.total}; "
                "check the assignment's size"
            )
        if self.offset + len(data) > chunk.total_size:
            raise _CorruptChunk(f"chunk at byte {chunk.offset} runs past the total size {chunk.total_size}")
        if hashlib.sha256(data).hexdigest() != chunk.chunk_sha256:
            raise _CorruptChunk(f"chunk at byte {chunk.offset} does not match its SHA-256")
        if not self.total_known:
            self.total = chunk.total_size
            self.total_known = True
            self._check_free_space()
        self.handle.write(data)
        self.hash.update(data)
        self.offset += len(data)
        self.unsynced_bytes += len(data)
        if self.unsynced_bytes >= self.downloader.fsync_interval_bytes:
            self.checkpoint_in_background()
        if self.progress is not None:
            self.progress(self.offset, self.total)

    def _check_free_space(self) -> None:
        needed = self.total - self.offset
        free = shutil.disk_usage(self.store.partial_dir).free
        if needed > free:
            raise OSError(errno.ENOSPC, f"{needed} bytes needed, {free} bytes free", str(self.store.partial_dir))

    def checkpoint_in_background(self) -> None:
        """Start fsyncing the .part file and recording the verified offset, unless a sync still runs.

        Raises the error of the previous background sync.
        """
        if self.sync is not None:
            if not self.sync.done():
                return  # The next chunk tries again.
            self.wait_for_sync()
        self.handle.flush()
        self.unsynced_bytes = 0
        state = PartialDownload(self.digest, self.total, self.offset)
        self.sync = _BackgroundSync(self.handle.fileno(), self.store, state)

    def wait_for_sync(self) -> None:
        """Wait for the background sync, if one was started; raise its error."""
        sync, self.sync = self.sync, None
        if sync is not None:
            sync.wait()

    def checkpoint(self) -> None:
        """Flush the .part file to disk, then record the verified offset."""
        self.wait_for_sync()
        if self.handle.closed:
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.unsynced_bytes = 0
        if self.total_known:
            self.store.write_partial(PartialDownload(self.digest, self.total, self.offset))

    def finish(self) -> str:
        """Flush and close the complete file, and return its hex SHA-256."""
        self.checkpoint()
        self.handle.close()
        return self.hash.hexdigest()

    def close_quietly(self) -> None:
        try:
            self.wait_for_sync()
        except Exception as error:  # The error being handled by the caller matters more.
            logger.debug("syncing %s failed: %s", self.store.part_path(self.digest), error)
        try:
            self.handle.close()
        except OSError as error:
            logger.debug("closing %s failed: %s", self.store.part_path(self.digest), error)
