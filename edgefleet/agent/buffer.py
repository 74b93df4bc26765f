"""On-disk buffer of metric batches that wait for delivery to the orchestrator, one file per batch."""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from edgefleet.common.files import fsync_directory
from edgefleet.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCHES = 10_000
# <sequence>-<batch id>.batch: the zero-padded sequence orders files by write time across restarts.
_FILE_PATTERN = re.compile(r"^(\d{16})-([0-9a-f]{32})\.batch$")
_SUFFIX = ".batch"
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class BufferLimits:
    """Bounds of the buffer; past either one the oldest batches are dropped."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_batches: int = DEFAULT_MAX_BATCHES

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"metric buffer max_bytes must be at least 1, got {self.max_bytes}")
        if self.max_batches < 1:
            raise ValueError(f"metric buffer max_batches must be at least 1, got {self.max_batches}")


@dataclass(frozen=True)
class BufferedBatch:
    """One batch read back from disk: its id (fixed when it was written) and its windows."""

    batch_id: str
    windows: tuple[common_pb2.MetricWindow, ...]
    size_bytes: int


@dataclass(frozen=True)
class _Entry:
    sequence: int
    batch_id: str
    path: Path
    size_bytes: int


class MetricBuffer:
    """Metric batches on disk until the orchestrator acknowledges them, oldest first.

    Each batch gets its id when it is written and keeps it across retries and agent restarts. The
    orchestrator stores a batch id once, so a batch that is resent is not stored twice. A batch is
    written to a temporary file, fsynced and renamed into place, and the directory is fsynced, so
    after a crash a batch file is either complete or absent. Start-up removes temporary files and
    batch files that do not parse. When a new batch would pass max_bytes or max_batches, the oldest
    batches are dropped and counted, with a warning. A single batch larger than max_bytes is kept
    alone. Threads may share one buffer.
    """

    def __init__(self, directory: Path, limits: BufferLimits | None = None) -> None:
        self.directory = Path(directory)
        self.limits = limits or BufferLimits()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._next_sequence = 0
        self.dropped_batches = 0
        self.dropped_windows = 0
        self.dropped_inferences = 0
        self._load()

    def _load(self) -> None:
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(_TEMP_SUFFIX):
                # A write that crashed before its rename; the batch was never acknowledged to anyone.
                path.unlink(missing_ok=True)
                log.info("removed unfinished metric batch file %s", path)
                continue
            match = _FILE_PATTERN.match(path.name)
            if match is None:
                log.warning("ignoring unexpected file %s in the metric buffer", path)
                continue
            if self._read(path) is None:
                path.unlink(missing_ok=True)
                continue
            sequence = int(match.group(1))
            self._entries.append(_Entry(sequence, match.group(2), path, path.stat().st_size))
            self._next_sequence = max(self._next_sequence, sequence + 1)
        if self._entries:
            log.info(
                "metric buffer %s contains %d undelivered batches (%d bytes)",
                self.directory,
                len(self._entries),
                self.total_bytes,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def total_bytes(self) -> int:
        """Bytes of the batch files in the buffer."""
        return sum(entry.size_bytes for entry in self._entries)

    def batch_ids(self) -> list[str]:
        """Return the ids of the buffered batches, oldest first."""
        with self._lock:
            return [entry.batch_id for entry in self._entries]

    def append(self, windows: Sequence[common_pb2.MetricWindow]) -> str:
        """Write windows as a new batch with a new id, durably, and return the id.

        Drops the oldest batches when the buffer would pass its limits. Raises OSError when the
        file cannot be written (a full disk, say); the buffer is then unchanged.
        """
        batch_id = uuid.uuid4().hex
        data = agent_pb2.UploadMetricsRequest(batch_id=batch_id, windows=list(windows)).SerializeToString()
        with self._lock:
            sequence = self._next_sequence
            self._next_sequence += 1
            path = self.directory / f"{sequence:016d}-{batch_id}{_SUFFIX}"
            temp = path.with_name(path.name + _TEMP_SUFFIX)
            try:
                with temp.open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.rename(temp, path)
            except OSError:
                temp.unlink(missing_ok=True)
                raise
            fsync_directory(self.directory)
            self._entries.append(_Entry(sequence, batch_id, path, len(data)))
            self._enforce_limits()
        return batch_id

    def oldest(self) -> BufferedBatch | None:
        """Return the oldest batch, or None when the buffer is empty.

        A batch file that no longer parses is deleted and counted as dropped, and the next is returned.
        """
        while True:
            with self._lock:
                if not self._entries:
                    return None
                entry = self._entries[0]
            request = self._read(entry.path)
            if request is not None:
                return BufferedBatch(entry.batch_id, tuple(request.windows), entry.size_bytes)
            with self._lock:
                if self._entries and self._entries[0] is entry:
                    self._entries.pop(0)
                    self.dropped_batches += 1
                entry.path.unlink(missing_ok=True)

    def remove(self, batch_id: str) -> None:
        """Delete a delivered batch; an unknown id is ignored."""
        with self._lock:
            for index, entry in enumerate(self._entries):
                if entry.batch_id == batch_id:
                    del self._entries[index]
                    entry.path.unlink(missing_ok=True)
                    return

    def drop(self, batch_id: str, reason: str) -> None:
        """Delete a batch the orchestrator rejected for good, counting it as dropped with a warning."""
        with self._lock:
            for index, entry in enumerate(self._entries):
                if entry.batch_id == batch_id:
                    del self._entries[index]
                    self._count_drop(entry)
                    entry.path.unlink(missing_ok=True)
                    break
            else:
                return
        log.warning("dropped metric batch %s: %s (dropped so far: %d batches)", batch_id, reason, self.dropped_batches)

    def _enforce_limits(self) -> None:
        dropped: list[_Entry] = []
        while len(self._entries) > 1 and (
            len(self._entries) > self.limits.max_batches or self.total_bytes > self.limits.max_bytes
        ):
            entry = self._entries.pop(0)
            self._count_drop(entry)
            entry.path.unlink(missing_ok=True)
            dropped.append(entry)
        if dropped:
            log.warning(
                "metric buffer full (limits %d batches, %d bytes): dropped the %d oldest batches; "
                "dropped so far: %d batches, %d windows, %d inferences",
                self.limits.max_batches,
                self.limits.max_bytes,
                len(dropped),
                self.dropped_batches,
                self.dropped_windows,
                self.dropped_inferences,
            )

    def _count_drop(self, entry: _Entry) -> None:
        self.dropped_batches += 1
        request = self._read(entry.path)
        if request is not None:
            self.dropped_windows += len(request.windows)
            self.dropped_inferences += sum(w.inference_count for w in request.windows)

    @staticmethod
    def _read(path: Path) -> agent_pb2.UploadMetricsRequest | None:
        try:
            data = path.read_bytes()
            request = agent_pb2.UploadMetricsRequest()
            request.ParseFromString(data)
        except (OSError, DecodeError) as error:
            log.warning("discarding unreadable metric batch file %s: %s", path, error)
            return None
        match = _FILE_PATTERN.match(path.name)
        if match is None or request.batch_id != match.group(2):
            log.warning("discarding metric batch file %s: its content has batch id %r", path, request.batch_id)
            return None
        return request
